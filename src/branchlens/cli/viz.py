"""Pictures and the report: ``visualize``, ``examples``, ``circuits``, ``report``."""

from __future__ import annotations

import typer

from branchlens.cli.common import (
    DEVICE_HELP,
    WEIGHTS_HELP,
    JsonOpt,
    command,
    echo_json,
    emit,
    int_list,
    result,
    run_lock,
)
from branchlens.cli.defaults import Home

# the blocks' dataclasses, which the stages take their defaults from too
VISUALIZE = Home("branchlens.settings:VisualizeConfig")
EXAMPLES = Home("branchlens.settings:ExamplesConfig")
CIRCUITS = Home("branchlens.settings:CircuitsConfig")
REPORT = Home("branchlens.settings:ReportConfig")


def _weights(home: Home):
    return home.opt("weights", "--weights", help=WEIGHTS_HELP)


def _device(home: Home):
    return home.opt("device", "--device", help=DEVICE_HELP)


def _progress(home: Home):
    return home.opt("show_progress", "--progress/--no-progress")


@command()
def visualize(
    run: str = typer.Argument(..., help="run directory (reads RUN/sae/<layer>/)"),
    layer: str = typer.Option(..., "--layer"),
    latents: str | None = VISUALIZE.opt("latents", "--latents", help="comma-separated latent ids"),
    channels: str | None = typer.Option(
        None, "--channels", help="comma-separated channel ids of the layer: visualize the "
        "network's own units (--objective channel, or neuron) instead of SAE latents"),
    n_latents: int = VISUALIZE.opt("n_latents", "--n-latents",
                                   help="without --latents: how many (at most, with evidence)"),
    select: str = VISUALIZE.opt(
        "select", "--select", help="without --latents: random (alive latents) | evidence (the "
        "latents the claims rest on, from the analysis, also restricted to their branch)"),
    per_cell: int = VISUALIZE.opt("per_cell", "--per-cell",
                                  help="evidence: latents per (layer, branch)"),
    pairs: int = VISUALIZE.opt("pairs", "--pairs", help="evidence: best cross-layer matched pairs"),
    objective: str | None = typer.Option(
        None, "--objective", help="latent (default) | latent_mean | direction | direction_mean; "
        "channel (default with --channels) | neuron"),
    branch: str | None = VISUALIZE.opt("branch", "--branch",
                                       help="restrict to one branch, e.g. 5x5"),
    size: int = VISUALIZE.opt("size", "--size"),
    steps: int = VISUALIZE.opt("steps", "--steps"),
    lr: float = VISUALIZE.opt("lr", "--lr"),
    redirect_relu_steps: int = VISUALIZE.opt(
        "redirect_relu_steps", "--redirect-relu-steps",
        help="first steps with Lucid's redirected ReLU gradient (0: off)"),
    batch_size: int = VISUALIZE.opt("batch_size", "--batch-size",
                                    help="latents optimised together"),
    seed: int = VISUALIZE.opt("seed", "--seed"),
    weights: str | None = _weights(VISUALIZE),
    device: str = _device(VISUALIZE),
    show_progress: bool = _progress(VISUALIZE),
    as_json: bool = JsonOpt,
) -> None:
    """Feature visualization of SAE latents or channels (batched) -> RUN/viz/featurevis/<layer>/."""
    from branchlens.stages.visualize import visualize_stage

    if channels is not None and latents is not None:
        raise ValueError("give --latents (SAE latents) or --channels (units), not both")
    if objective is None:
        objective = "channel" if channels is not None else VISUALIZE.default("objective")
    elif channels is not None and objective not in ("channel", "neuron"):
        raise ValueError(f"--channels takes --objective channel or neuron, not {objective!r}")
    targets = int_list(channels if channels is not None else latents)
    with run_lock(run):
        idx = visualize_stage(run, layer, targets, n_latents=n_latents, objective=objective,
                              branch=branch, size=size, steps=steps, lr=lr, seed=seed,
                              batch_size=batch_size, weights=weights, device=device,
                              show_progress=show_progress,
                              redirect_relu_steps=redirect_relu_steps, select=select,
                              per_cell=per_cell, pairs=pairs)
    result({"layer": layer, "images": len(idx["latents"]), "objective": objective,
            "branch": branch}, as_json, "feature visualizations")


@command()
def examples(
    run: str = typer.Argument(..., help="run directory"),
    layer: str = typer.Option(..., "--layer"),
    source: str | None = EXAMPLES.opt("source", "--source", help="default: the store's source"),
    n_top: int = EXAMPLES.opt("n_top", "--n-top"),
    latents: str | None = EXAMPLES.opt("latents", "--latents", help="latents to draw strips for"),
    n_strips: int = EXAMPLES.opt("n_strips", "--n-strips"),
    maps: bool = EXAMPLES.opt("maps", "--maps/--no-maps", help="latent heatmap overlay"),
    limit: int | None = EXAMPLES.opt("limit", "--limit", help="first N images"),
    batch_size: int = EXAMPLES.opt("batch_size", "--batch-size"),
    weights: str | None = _weights(EXAMPLES),
    device: str = _device(EXAMPLES),
    show_progress: bool = _progress(EXAMPLES),
    as_json: bool = JsonOpt,
) -> None:
    """Top dataset examples of every latent, RF crops -> RUN/viz/examples/<layer>/."""
    from branchlens.stages.examples import examples_stage

    with run_lock(run):
        idx = examples_stage(run, layer, source=source, n_top=n_top, latents=int_list(latents),
                             n_strips=n_strips, maps=maps, batch_size=batch_size, limit=limit,
                             weights=weights, device=device, show_progress=show_progress)
    result({"layer": layer, "images": idx["n_images"], "strips": len(idx["latents"]),
            "receptive_field": idx["receptive_field"]}, as_json, "dataset examples")


@command()
def circuits(
    run: str = typer.Argument(..., help="run directory"),
    up: str = typer.Option(..., "--up", help="upstream block, e.g. mixed4a"),
    down: str = typer.Option(..., "--down", help="downstream block, e.g. mixed4b"),
    latents: str | None = CIRCUITS.opt("latents", "--latents", help="downstream latents"),
    n_latents: int = CIRCUITS.opt("n_latents", "--n-latents"),
    n_images: int = CIRCUITS.opt("n_images", "--n-images", help="top images per latent"),
    flow_latents: int = CIRCUITS.opt("flow_latents", "--flow-latents"),
    n_perm: int = CIRCUITS.opt("n_perm", "--n-perm"),
    top_k: int = CIRCUITS.opt("top_k", "--top-k"),
    ablate: int = CIRCUITS.opt("ablate", "--ablate",
                               help="latents for the branch-zeroing check"),
    source: str | None = CIRCUITS.opt("source", "--source"),
    weights: str | None = _weights(CIRCUITS),
    device: str = _device(CIRCUITS),
    show_progress: bool = _progress(CIRCUITS),
    as_json: bool = JsonOpt,
) -> None:
    """Latent-to-latent attribution, branch flow vs null, branch ablation -> RUN/viz/circuits/."""
    from branchlens.stages.circuits import circuits_stage

    with run_lock(run):
        doc = circuits_stage(run, up, down, latents=int_list(latents), n_latents=n_latents,
                             n_images=n_images, flow_latents=flow_latents, n_perm=n_perm,
                             top_k=top_k, ablate=ablate, source=source, weights=weights,
                             device=device, show_progress=show_progress)
    result({"up": up, "down": down, "latents": len(doc["latents"]),
            "error_share_mean": round(doc["error_share_mean"], 4)}, as_json, "circuits")


@command()
def report(
    run_dir: str = typer.Argument(..., help="run directory (RUN/)"),
    out: str | None = REPORT.opt("out", "--out", help="default: RUN/report/index.html"),
    cards_per_layer: int = REPORT.opt("cards_per_layer", "--cards-per-layer",
                                      help="gallery cards per layer (plus rendered latents)"),
    as_json: bool = JsonOpt,
) -> None:
    """One self-contained HTML report of a run (works on partial runs)."""
    from branchlens.schema import check_block
    from branchlens.stages.report import build_report

    check_block("report", {"cards_per_layer": cards_per_layer})
    with run_lock(run_dir):
        path = build_report(run_dir, out, cards_per_layer=cards_per_layer)
    size = path.stat().st_size
    if as_json:
        echo_json({"report": str(path), "bytes": size})
    else:
        emit(f"report: {path} ({size / 1e6:.1f} MB)")
