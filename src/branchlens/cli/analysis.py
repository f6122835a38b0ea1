"""Statistics and interventions on a trained run: ``analyze``, ``stability``, ``effects``,
``steer``."""

from __future__ import annotations

from pathlib import Path

import typer

from branchlens.cli.common import (
    RUN_WEIGHTS_HELP,
    JsonOpt,
    RunDeviceOpt,
    command,
    echo_json,
    emit,
    int_list,
    names,
    run_lock,
    say,
)
from branchlens.cli.defaults import Home
from branchlens.layout import RunLayout

ANALYZE = Home("branchlens.settings:AnalysisConfig")
STABILITY = Home("branchlens.stages.stability:stability")
EFFECTS = Home("branchlens.stages.effects:effects")
RUN = Home("branchlens.run:Run")
INTERVENE = Home("branchlens.run:Run.intervene")
STAGE_DEVICE_HELP = "cpu | cuda[:N]"
LAYERS_HELP = "comma-separated; default: every analysed layer"


@command()
def analyze(
    run: str = typer.Argument(..., help="run folder with store/ and sae/<layer>/"),
    layers: str | None = typer.Option(None, "--layers",
                                      help="comma-separated; default: every trained layer"),
    q: float = ANALYZE.opt("q", "--q", help="BH false discovery rate per branch"),
    n_perm: int = ANALYZE.opt("n_perm", "--n-perm",
                              help="first round of channel permutations per latent (then "
                                   "refined adaptively until BH can decide)"),
    max_perm: int | None = ANALYZE.opt("max_perm", "--max-perm",
                                       help="cap of the refinement (default ceil(20·m/q))"),
    curve_reps: int = ANALYZE.opt("curve_reps", "--curve-reps",
                                  help="null replicates of the sorted-ratio curve"),
    min_images: int = ANALYZE.opt("min_images", "--min-images",
                                  help="distinct firing images to take part in matching"),
    match_threshold: float = ANALYZE.opt("match_threshold", "--match-threshold",
                                         help="activation correlation of a cross-layer pair"),
    embed: str = ANALYZE.opt("embed", "--embed", help="auto (UMAP, else PCA) | umap | pca | none"),
    seed: int = ANALYZE.opt("seed", "--seed"),
    device: str = RunDeviceOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Branch specialization statistics of every trained layer into RUN/analysis/."""
    from branchlens.analysis import AnalysisConfig, format_table
    from branchlens.schema import check_block
    from branchlens.stages.analyze import analyze as run_analyze

    settings = dict(q=q, n_perm=n_perm, max_perm=max_perm, curve_reps=curve_reps,
                    min_images=min_images, match_threshold=match_threshold, embed=embed)
    check_block("analyze", settings)
    cfg = AnalysisConfig(**settings, seed=seed, device=device)
    with run_lock(run):
        summary = run_analyze(run, layers=names(layers), config=cfg, log=say)
    if as_json:
        per_layer = summary["per_layer"]
        echo_json({"analysis": str(RunLayout(run).analysis_dir), "layers": summary["layers"],
                   "claims": [{k: c[k] for k in ("id", "claim", "verdict", "evidence")}
                              for c in summary["claims"]],
                   "dominant": {k: v["dominant_counts"] for k, v in per_layer.items()},
                   "robust_dominant": {k: v["robust_dominant_counts"]
                                       for k, v in per_layer.items()}})
        return
    emit(format_table(summary))
    emit(f"written: {RunLayout(run).analysis_dir}/ (summary, latent and layer tables, figures)")


@command()
def stability(
    run: str = typer.Argument(..., help="an analysed run folder"),
    layers: str | None = STABILITY.opt("layers", "--layers", help=LAYERS_HELP),
    replicates: int = STABILITY.opt("replicates", "--replicates",
                                    help="SAEs per layer, the run's own included (>= 2)"),
    device: str = STABILITY.opt("device", "--device", help=STAGE_DEVICE_HELP),
    as_json: bool = JsonOpt,
) -> None:
    """Train replicate SAEs (other seeds), analyse them, and report which verdicts, labels and
    latents survive (RUN/analysis/stability.json; a `stability` entry on every claim)."""
    from branchlens.stages.stability import format_stability
    from branchlens.stages.stability import stability as run_stability

    with run_lock(run):
        res = run_stability(run, names(layers), replicates=replicates, device=device, log=say)
    if as_json:
        echo_json({"stability": str(RunLayout(run).stability_path), "claims": res["claims"]})
        return
    emit(format_stability(res))


@command()
def effects(
    run: str = typer.Argument(..., help="an analysed run folder"),
    layers: str | None = EFFECTS.opt("layers", "--layers", help=LAYERS_HELP),
    scope: str = EFFECTS.opt("scope", "--scope", help="which latents get a promotes/"
                             "suppresses label: robust (every robustly branch-labelled latent, "
                             "the ones the claims rest on) | all (every alive latent) | none "
                             "(only the causal test)"),
    n_top: int = EFFECTS.opt("n_top", "--top-images", help="held-out top images per latent "
                             "on which it is ablated"),
    n_boot: int = EFFECTS.opt("n_boot", "--n-boot", help="bootstrap resamples of image groups"),
    weights: str | None = EFFECTS.opt("weights", "--weights", help=RUN_WEIGHTS_HELP),
    device: str = EFFECTS.opt("device", "--device", help=STAGE_DEVICE_HELP),
    show_progress: bool = EFFECTS.opt("show_progress", "--progress/--no-progress"),
    as_json: bool = JsonOpt,
) -> None:
    """Ablate latents and see what the network does: per latent the classes it promotes and
    suppresses (RUN/effects/latents_<layer>.csv), and the animal claim tested causally (the
    `animals_causal` row of the claims table)."""
    from branchlens.stages.effects import effects as run_effects

    with run_lock(run):
        claim = run_effects(run, names(layers), scope=scope, n_top=n_top, n_boot=n_boot,
                            device=device, weights=weights, log=say,
                            show_progress=show_progress)
    if as_json:
        echo_json({"effects": f"{RunLayout(run).effects_dir}/", "claim": claim})
        return
    emit(f"{claim['claim']}: {claim['verdict']}\n  {claim['evidence']}")


@command()
def steer(
    run: str = typer.Argument(..., help="a run folder with an SAE for --layer"),
    layer: str = typer.Option(..., "--layer"),
    latents: str = typer.Option(..., "--latents", help="comma-separated latent ids"),
    scale: float = INTERVENE.opt("scale", "--scale", help="α: 0 ablates, 2 doubles, 1 changes "
                                 "nothing; x' = x + Σ (α − 1)·z_i·d_i"),
    images: str | None = typer.Option(None, "--images", help="comma-separated image files; "
                                      "default: the SAE's first held-out images"),
    n_images: int = INTERVENE.opt("n_images", "--n-images", help="held-out images when "
                                  "--images is not given"),
    k: int = Home("branchlens.interventions:Intervention.summary").opt(
        "k", "--top", help="classes shown before/after"),
    weights: str | None = RUN.opt("weights", "--weights", help=RUN_WEIGHTS_HELP),
    device: str = RUN.opt("device", "--device", help=STAGE_DEVICE_HELP),
    as_json: bool = JsonOpt,
) -> None:
    """Run the network with latents scaled (ablated, amplified) at one layer and show how the
    predictions change: per image the top classes before/after, and the mean change per class."""
    from branchlens.run import Run
    from branchlens.variants import class_names

    ids = int_list(latents) or []
    r = Run(run, device=device, weights=weights)
    if layer not in r.layers:
        raise ValueError(f"no SAE for layer {layer!r} in {run}; layers: "
                         f"{', '.join(r.layers) or 'none'}")
    paths = [p for p in (images or "").split(",") if p]
    for p in paths:
        if not Path(p).is_file():
            raise ValueError(f"--images: no such file {p}")
    res = r.intervene(paths or None, layer, ids, scale, n_images=n_images)
    label = class_names(r.model().variant)
    summ = res.summary(k)
    if as_json:
        echo_json({key: summ[key] for key in ("n_images", "max_abs_delta_prob", "top1_changed")}
                  | {"layer": layer, "latents": ids, "scale": scale,
                     "mean_delta_prob": [[label[c], d] for c, d in summ["mean_delta_prob"]]})
        return

    def show(pairs: list) -> str:
        return ", ".join(f"{label[c]} {p:.3f}" for c, p in pairs)

    for im in summ["images"]:
        emit(f"{im['id']}\n  before: {show(im['before'])}\n  after:  {show(im['after'])}")
    emit("mean change per class: " + ", ".join(f"{label[c]} {d:+.4f}"
                                               for c, d in summ["mean_delta_prob"]))
    emit(f"largest change of any class probability: {summ['max_abs_delta_prob']:.4f}; top-1 "
         f"changed on {summ['top1_changed']}/{summ['n_images']} images")
