"""Command line: a thin shell over the Python API (``python -m branchlens`` works too)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from branchlens.variants import DEFAULT_VARIANT

_GLOBAL_FLAG = re.compile(r"--quiet|--verbose|--debug|-[qv]+")  # the callback's flags


class _Group(TyperGroup):
    """The global flags (``-q``, ``-v``, ``--debug``) also work after the command
    (``branchlens classify -q``): they are moved in front of it before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _globals_first(self, ctx, list(args)))


def _globals_first(group: TyperGroup, ctx: Any, args: list[str]) -> list[str]:
    """``args`` with the global flags that follow the command moved before it; an option's
    value (``--out -q``) and anything after ``--`` stay where they are."""
    at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    cmd = group.get_command(ctx, args[at]) if at is not None else None
    if cmd is None:
        return args
    valued = {o for p in cmd.params if p.param_type_name == "option" and not p.is_flag
              and not p.count for o in p.opts}
    moved, rest, tail, i = [], [], args[at + 1:], 0
    while i < len(tail):
        if tail[i] == "--":
            rest += tail[i:]
            break
        if tail[i] in valued:
            rest += tail[i:i + 2]
            i += 2
            continue
        (moved if _GLOBAL_FLAG.fullmatch(tail[i]) else rest).append(tail[i])
        i += 1
    return args[:at] + moved + [args[at]] + rest


app = typer.Typer(cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TopK SAEs on InceptionV1 and branch specialization. Errors are one line "
                       "on stderr (exit 2); --debug shows the traceback. Global options may "
                       "also follow the command (branchlens classify -q).")
USER_ERROR_RC = 2  # what every refused input or failed stage exits with
DEBUG_ENV = "BRANCHLENS_DEBUG"
_debug_set_here = False  # DEBUG_ENV came from a --debug of this process (not the user's shell)
QUIET_ENV = "BRANCHLENS_QUIET"  # read by branchlens.progress: no progress bars
log = logging.getLogger("branchlens")


def rank() -> int:
    """This process's rank under torchrun (``RANK``); 0 when not distributed."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        return msg if rank() == 0 else f"[rank {rank()}] {msg}"


def _version(value: bool) -> None:
    if value:
        from branchlens import __version__

        typer.echo(f"branchlens {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of errors"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="debug messages on stderr too"),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="only warnings and errors on stderr; no progress bars"),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="print the version and exit"),
) -> None:
    """Global options. Under torchrun only rank 0 prints results (other ranks: warnings)."""
    global _debug_set_here
    if debug:
        os.environ[DEBUG_ENV] = "1"
        _debug_set_here = True
    elif _debug_set_here:  # an earlier call in this process said --debug; this one did not
        os.environ.pop(DEBUG_ENV, None)
        _debug_set_here = False
    level = logging.DEBUG if verbose else logging.INFO
    os.environ.pop(QUIET_ENV, None)
    if quiet or rank() != 0:
        level = logging.WARNING
        os.environ[QUIET_ENV] = "1"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _info(message: str) -> None:
    """A stage's progress line (stderr; hidden by -q and on ranks other than 0)."""
    log.info(message)


def _out(text: str = "", **kw: Any) -> None:
    """A result on stdout: rank 0 only."""
    if rank() == 0:
        typer.secho(text, **kw)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors become one line on stderr and exit code 2; ``--debug`` re-raises for the trace."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_common(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get(DEBUG_ENV) == "1" or _is_click_error(e):
                raise
            msg = str(e) if isinstance(e, (ValueError, RuntimeError, OSError)) \
                else f"{type(e).__name__}: {e}"
            msg = "; ".join(ln.strip() for ln in msg.strip().splitlines() if ln.strip())
            where = "" if rank() == 0 else f"[rank {rank()}] "
            typer.secho(f"{where}error: {msg}", fg="red", err=True)
            raise typer.Exit(USER_ERROR_RC) from None
    return wrapper


def _check_common(options: dict[str, Any]) -> None:
    """``--seed`` and ``--device`` of any command, refused before it reads or writes anything
    (a bad seed would otherwise fail after the harvest; a missing GPU would blame the SAE)."""
    if options.get("seed") is not None:
        from branchlens.config import check_seed

        check_seed(options["seed"], "--seed")
    if options.get("device") is not None:
        from branchlens.devices import resolve_device

        resolve_device(options["device"])


def _is_click_error(e: Exception) -> bool:
    """Usage errors (bad option values) are printed by typer itself, with exit code 2."""
    return type(e).__module__.split(".")[0] in ("click", "typer")


def _refuse(e: Exception) -> NoReturn:
    """A command's own one-line error (exit 2); under ``--debug`` the exception goes on, so that
    its traceback is printed like every other command's."""
    if os.environ.get(DEBUG_ENV) == "1":
        raise e
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(USER_ERROR_RC) from None


@contextlib.contextmanager
def _run_lock(run: str) -> Iterator[None]:
    """The run folder's lock while a stage command writes into it, the one ``branchlens run``
    holds, so a stage beside a running pipeline is refused instead of mixing results. A folder
    that is no run gets no ``.lock`` (the stage itself says what is missing); ranks other than
    0 of torchrun do not lock, like the pipeline's."""
    from branchlens.run import is_run_folder
    from branchlens.store import RunLock

    if rank() != 0 or not is_run_folder(run):
        yield
        return
    lock = RunLock(run, "run folder").acquire()
    try:
        yield
    finally:
        lock.release()


VariantOpt = typer.Option(DEFAULT_VARIANT, "--variant", help="bvlc_googlenet | inception5h")
WeightsOpt = typer.Option(
    None, "--weights",
    help="weights file (.safetensors / .pth), or 'random' for a smoke run; default: the "
         "variant's env var ($BRANCHLENS_BVLC_WEIGHTS / $BRANCHLENS_INCEPTION5H_WEIGHTS), the "
         "cache, or a download")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]")
ImageKeyOpt = typer.Option(None, "--image-key", help="hf: sources: the image column")
LabelKeyOpt = typer.Option(None, "--label-key", help="hf: sources: the label column")


def _echo_json(obj) -> None:
    _out(json.dumps(obj, indent=None))


JsonOpt = typer.Option(False, "--json", help="the result as one JSON line on stdout, nothing else")


def _result(obj: dict[str, Any], as_json: bool, title: str) -> None:
    """A command's result: one JSON line with ``--json``, else ``title: key value, ...``."""
    if as_json:
        _echo_json(obj)
    else:
        _out(f"{title}: " + ", ".join(f"{k} {v}" for k, v in obj.items()))


@app.command()
def info(variant: str = VariantOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Layers, branch slices, output shapes and parameter count of a model variant."""
    from branchlens.model import InceptionV1, output_shape
    from branchlens.variants import branch_slices, get_variant

    v = get_variant(variant)
    n_params = sum(p.numel() for p in InceptionV1(v).parameters())
    layers = {}
    for b in v.blocks:
        c, h, w = output_shape(v, b.name)
        layers[b.name] = {
            "channels": b.out_channels, "shape": [c, h, w],
            "branches": {k: [s.start, s.stop] for k, s in branch_slices(v, b.name).items()},
            "bottlenecks": {"3x3": b.b3x3_bottleneck, "5x5": b.b5x5_bottleneck},
        }
    out = {"variant": v.name, "description": v.description, "parameters": n_params,
           "num_classes": v.num_classes, "layers": layers}
    if as_json:
        _echo_json(out)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{v.name}: {v.description} ({n_params:,} parameters)")
    for col in ("layer", "shape", "1x1", "3x3", "5x5", "pool", "bottlenecks 3x3/5x5"):
        t.add_column(col)
    for name, d in layers.items():
        br = d["branches"]
        t.add_row(name, "x".join(map(str, d["shape"])),
                  *(f"{br[k][0]}:{br[k][1]}" for k in ("1x1", "3x3", "5x5", "pool")),
                  f"{d['bottlenecks']['3x3']}/{d['bottlenecks']['5x5']}")
    if rank() == 0:
        Console().print(t)


@app.command()
def classify(
    source: str = typer.Argument("embedded", help="folder, file list, embedded[:N], hf:, wds:"),
    variant: str = VariantOpt,
    weights: str | None = WeightsOpt,
    device: str = DeviceOpt,
    batch_size: int = typer.Option(32, "--batch-size"),
    workers: int = typer.Option(2, "--workers"),
    paper_compat: bool = typer.Option(False, "--paper-compat",
                                      help="feed [0,1] RGB like the paper's harvest"),
    show: int = typer.Option(10, "--show", help="predictions to print (-1: all)"),
    limit: int | None = typer.Option(None, "--limit", help="first N images of SOURCE"),
    image_key: str | None = ImageKeyOpt,
    label_key: str | None = LabelKeyOpt,
    as_json: bool = typer.Option(False, "--json",
                                 help="JSON Lines on stdout: one object per shown prediction "
                                      "(--show), then one summary object"),
) -> None:
    """Top-5 predictions (with class names) and accuracy when labels are known."""
    from branchlens.classify import classify as run_classify
    from branchlens.classify import format_prediction
    from branchlens.data import open_source
    from branchlens.devices import resolve_device
    from branchlens.streaming import with_columns
    from branchlens.weights import load_model

    if batch_size < 1 or workers < 0:
        raise ValueError(f"need --batch-size >= 1 and --workers >= 0, got {batch_size}, "
                         f"{workers}")
    src = open_source(with_columns(source, image_key, label_key), variant, limit=limit)
    model, winfo = load_model(variant, weights, resolve_device(device))  # after the source check
    res = run_classify(model, src, batch_size=batch_size, workers=workers,
                       paper_compat=paper_compat)
    if not res.predictions:
        raise ValueError(f"no image of {source!r} could be classified "
                         f"({res.skips.summary()})")
    summary = res.summary() | {"variant": model.variant.name, "weights": winfo.to_dict()}
    if as_json:
        for p in res.predictions[: None if show < 0 else show]:
            _echo_json({"image_id": p.image_id, "label": p.label, "top5": p.top5,
                        "probs": [round(q, 4) for q in p.probs]})
        _echo_json({k: summary[k] for k in ("n", "top1", "top5", "skipped")})
        return
    for p in res.predictions[: None if show < 0 else show]:
        _out(format_prediction(p, model.variant))
    _out(res.skips.summary())
    if summary["labelled"]:
        n = summary["labelled"]
        _out(f"top-1 {summary['top1']}/{n}  top-5 {summary['top5']}/{n}")
    if winfo.random:
        _out("WARNING: random weights — predictions are meaningless", fg="red")


@app.command()
def harvest(
    source: str = typer.Argument(..., help="folder, file list, embedded[:N], hf:, wds:"),
    layers: str = typer.Option("mixed4a,mixed4b,mixed4c,mixed4d,mixed4e", "--layers",
                               help="comma-separated named outputs (blocks, branches, ...)"),
    out: str = typer.Option(..., "--out", help="store folder, e.g. RUN/store"),
    variant: str = VariantOpt,
    weights: str | None = WeightsOpt,
    device: str = DeviceOpt,
    sampling: str = typer.Option("norm", "--sampling", help="norm | uniform | all"),
    samples_per_image: int = typer.Option(10, "--samples-per-image"),
    aligned: bool = typer.Option(False, "--aligned",
                                 help="same positions for layers of equal grid size"),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16 | fp32"),
    batch_size: int = typer.Option(32, "--batch-size"),
    workers: int = typer.Option(1, "--workers", help="decode processes per rank"),
    seed: int = typer.Option(0, "--seed"),
    shard_size: int = typer.Option(1000, "--shard-size", help="images per shard"),
    paper_compat: bool = typer.Option(False, "--paper-compat",
                                      help="feed [0,1] RGB like the paper's harvest"),
    limit: int | None = typer.Option(None, "--limit", help="first N images of SOURCE"),
    flip: bool = typer.Option(False, "--flip", help="add every image's mirror as a 2nd view"),
    image_key: str | None = ImageKeyOpt,
    label_key: str | None = LabelKeyOpt,
    show_progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Activations of many layers in one pass into a resumable store (torchrun: ranks)."""
    from branchlens.harvest import harvest as run_harvest
    from branchlens.store import StoreError
    from branchlens.streaming import with_columns

    source = with_columns(source, image_key, label_key)
    try:
        res = run_harvest(source, out, layers, variant=variant, weights=weights, device=device,
                          sampling=sampling, samples_per_image=samples_per_image,
                          aligned=aligned, dtype=dtype, batch_size=batch_size, workers=workers,
                          seed=seed, shard_size=shard_size, paper_compat=paper_compat,
                          limit=limit, flip=flip, show_progress=show_progress)
    except (StoreError, ValueError) as e:
        _refuse(e)
    if res.manifest is None:
        return
    c = res.manifest["counts"]
    summary = {"store": str(res.path), "images": c["images"], "skipped": c["images_skipped"],
               "vectors": c["vectors"], "resumed_images": res.resumed_images,
               "world_size": res.world_size}
    if as_json:
        _echo_json(summary)
        return
    _out(f"store {res.path}: {c['images']} images ({c['images_skipped']} skipped, "
               f"{res.resumed_images} already done), world size {res.world_size}")
    for layer, n in c["vectors"].items():
        _out(f"  {layer}: {n} vectors")
    if res.manifest["skips"]["counts"]:
        _out(f"  skips: {res.manifest['skips']['counts']}")


@app.command()
def analyze(
    run: str = typer.Argument(..., help="run folder with store/ and sae/<layer>/"),
    layers: str | None = typer.Option(None, "--layers",
                                      help="comma-separated; default: every trained layer"),
    q: float = typer.Option(0.05, "--q", help="BH false discovery rate per branch"),
    n_perm: int = typer.Option(1000, "--n-perm",
                               help="first round of channel permutations per latent (then "
                                    "refined adaptively until BH can decide)"),
    max_perm: int | None = typer.Option(None, "--max-perm",
                                        help="cap of the refinement (default ceil(20·m/q))"),
    curve_reps: int = typer.Option(200, "--curve-reps",
                                   help="null replicates of the sorted-ratio curve"),
    min_images: int = typer.Option(20, "--min-images",
                                   help="distinct firing images to take part in matching"),
    match_threshold: float = typer.Option(0.5, "--match-threshold",
                                          help="activation correlation of a cross-layer pair"),
    embed: str = typer.Option("auto", "--embed", help="auto (UMAP, else PCA) | umap | pca | none"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
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
    try:
        with _run_lock(run):
            summary = run_analyze(run, layers=layers.split(",") if layers else None,
                                  config=cfg, log=_info)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _refuse(e)
    if as_json:
        _echo_json({"analysis": f"{run}/analysis", "layers": summary["layers"],
                    "claims": [{k: c[k] for k in ("id", "claim", "verdict", "evidence")}
                               for c in summary["claims"]],
                    "dominant": {k: v["dominant_counts"]
                                 for k, v in summary["per_layer"].items()},
                    "robust_dominant": {k: v["robust_dominant_counts"]
                                        for k, v in summary["per_layer"].items()}})
        return
    _out(format_table(summary))
    _out(f"written: {run}/analysis/ (summary.json, latents.csv, layers.csv, figures)")


@app.command()
def stability(
    run: str = typer.Argument(..., help="an analysed run folder"),
    layers: str | None = typer.Option(None, "--layers",
                                      help="comma-separated; default: every analysed layer"),
    replicates: int = typer.Option(3, "--replicates",
                                   help="SAEs per layer, the run's own included (>= 2)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda[:N]"),
    as_json: bool = JsonOpt,
) -> None:
    """Train replicate SAEs (other seeds), analyse them, and report which verdicts, labels and
    latents survive (RUN/analysis/stability.json; a `stability` entry on every claim)."""
    from branchlens.stages.stability import format_stability
    from branchlens.stages.stability import stability as run_stability

    try:
        with _run_lock(run):
            res = run_stability(run, layers.split(",") if layers else None, replicates,
                                device=device, log=_info)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _refuse(e)
    if as_json:
        _echo_json({"stability": f"{run}/analysis/stability.json", "claims": res["claims"]})
        return
    _out(format_stability(res))


RunWeightsOpt = typer.Option(None, "--weights", help="the weights the store was harvested "
                             "with (default: as the run recorded)")


@app.command()
def effects(
    run: str = typer.Argument(..., help="an analysed run folder"),
    layers: str | None = typer.Option(None, "--layers",
                                      help="comma-separated; default: every analysed layer"),
    scope: str = typer.Option("robust", "--scope", help="which latents get a promotes/"
                              "suppresses label: robust (every robustly branch-labelled latent, "
                              "the ones the claims rest on) | all (every alive latent) | none "
                              "(only the causal test)"),
    top_images: int = typer.Option(4, "--top-images", help="held-out top images per latent "
                                   "on which it is ablated"),
    n_boot: int = typer.Option(2000, "--n-boot", help="bootstrap resamples of image groups"),
    weights: str | None = RunWeightsOpt,
    device: str = typer.Option("cpu", "--device", help="cpu | cuda[:N]"),
    show_progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = JsonOpt,
) -> None:
    """Ablate latents and see what the network does: per latent the classes it promotes and
    suppresses (RUN/effects/latents_<layer>.csv), and the animal claim tested causally (the
    `animals_causal` row of the claims table)."""
    from branchlens.stages.effects import effects as run_effects

    try:
        with _run_lock(run):
            claim = run_effects(run, layers.split(",") if layers else None, scope=scope,
                                n_top=top_images, n_boot=n_boot, device=device,
                                weights=weights, log=_info,
                                show_progress=show_progress)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _refuse(e)
    if as_json:
        _echo_json({"effects": f"{run}/effects/", "claim": claim})
        return
    _out(f"{claim['claim']}: {claim['verdict']}\n  {claim['evidence']}")


@app.command()
def steer(
    run: str = typer.Argument(..., help="a run folder with an SAE for --layer"),
    layer: str = typer.Option(..., "--layer"),
    latents: str = typer.Option(..., "--latents", help="comma-separated latent ids"),
    scale: float = typer.Option(0.0, "--scale", help="α: 0 ablates, 2 doubles, 1 changes "
                                "nothing; x' = x + Σ (α − 1)·z_i·d_i"),
    images: str | None = typer.Option(None, "--images", help="comma-separated image files; "
                                      "default: the SAE's first held-out images"),
    n_images: int = typer.Option(8, "--n-images", help="held-out images when --images is not "
                                 "given"),
    top: int = typer.Option(5, "--top", help="classes shown before/after"),
    weights: str | None = RunWeightsOpt,
    device: str = typer.Option("cpu", "--device", help="cpu | cuda[:N]"),
    as_json: bool = JsonOpt,
) -> None:
    """Run the network with latents scaled (ablated, amplified) at one layer and show how the
    predictions change: per image the top classes before/after, and the mean change per class."""
    from branchlens.run import Run
    from branchlens.variants import class_names

    try:
        ids = _int_list(latents) or []
        r = Run(run, device=device, weights=weights)
        if layer not in r.layers:
            raise ValueError(f"no SAE for layer {layer!r} in {run}; layers: "
                             f"{', '.join(r.layers) or 'none'}")
        paths = [p for p in (images or "").split(",") if p]
        for p in paths:
            if not Path(p).is_file():
                raise ValueError(f"--images: no such file {p}")
        res = r.intervene(paths or None, layer, ids, scale, n_images=n_images)
        names = class_names(r.model().variant)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _refuse(e)
    summ = res.summary(top)
    if as_json:
        _echo_json({k: summ[k] for k in ("n_images", "max_abs_delta_prob", "top1_changed")}
                   | {"layer": layer, "latents": ids, "scale": scale,
                      "mean_delta_prob": [[names[c], d] for c, d in summ["mean_delta_prob"]]})
        return

    def show(pairs: list) -> str:
        return ", ".join(f"{names[c]} {p:.3f}" for c, p in pairs)

    for im in summ["images"]:
        _out(f"{im['id']}\n  before: {show(im['before'])}\n  after:  {show(im['after'])}")
    _out("mean change per class: " + ", ".join(f"{names[c]} {d:+.4f}"
                                                 for c, d in summ["mean_delta_prob"]))
    _out(f"largest change of any class probability: {summ['max_abs_delta_prob']:.4f}; top-1 "
         f"changed on {summ['top1_changed']}/{summ['n_images']} images")


def _int_list(s: str | None) -> list[int] | None:
    try:
        return [int(t) for t in s.split(",") if t.strip()] if s else None
    except ValueError:
        raise ValueError(f"expected comma-separated integer ids, got {s!r}") from None


@app.command()
def visualize(
    run: str = typer.Argument(..., help="run directory (reads RUN/sae/<layer>/)"),
    layer: str = typer.Option(..., "--layer"),
    latents: str | None = typer.Option(None, "--latents", help="comma-separated latent ids"),
    channels: str | None = typer.Option(
        None, "--channels", help="comma-separated channel ids of the layer: visualize the "
        "network's own units (--objective channel, or neuron) instead of SAE latents"),
    n_latents: int = typer.Option(16, "--n-latents",
                                  help="without --latents: how many (at most, with evidence)"),
    select: str = typer.Option(
        "random", "--select", help="without --latents: random (alive latents) | evidence (the "
        "latents the claims rest on, from the analysis, also restricted to their branch)"),
    per_cell: int = typer.Option(4, "--per-cell", help="evidence: latents per (layer, branch)"),
    pairs: int = typer.Option(4, "--pairs", help="evidence: best cross-layer matched pairs"),
    objective: str | None = typer.Option(
        None, "--objective", help="latent (default) | latent_mean | direction | direction_mean; "
        "channel (default with --channels) | neuron"),
    branch: str | None = typer.Option(None, "--branch", help="restrict to one branch, e.g. 5x5"),
    size: int = typer.Option(224, "--size"),
    steps: int = typer.Option(512, "--steps"),
    lr: float = typer.Option(0.05, "--lr"),
    redirect: int = typer.Option(16, "--redirect-relu-steps",
                                 help="first steps with Lucid's redirected ReLU gradient (0: off)"),
    batch_size: int = typer.Option(16, "--batch-size", help="latents optimised together"),
    seed: int = typer.Option(0, "--seed"),
    weights: str | None = WeightsOpt,
    device: str = DeviceOpt,
    show_progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = JsonOpt,
) -> None:
    """Feature visualization of SAE latents or channels (batched) -> RUN/viz/featurevis/<layer>/."""
    from branchlens.stages.viz import visualize_stage

    if channels is not None and latents is not None:
        raise ValueError("give --latents (SAE latents) or --channels (units), not both")
    if objective is None:
        objective = "channel" if channels is not None else "latent"
    elif channels is not None and objective not in ("channel", "neuron"):
        raise ValueError(f"--channels takes --objective channel or neuron, not {objective!r}")
    targets = _int_list(channels if channels is not None else latents)
    with _run_lock(run):
        idx = visualize_stage(run, layer, targets, n_latents=n_latents, objective=objective,
                              branch=branch, size=size, steps=steps, lr=lr, seed=seed,
                              batch_size=batch_size, weights=weights, device=device,
                              show_progress=show_progress, redirect_relu_steps=redirect,
                              select=select, per_cell=per_cell, pairs=pairs)
    _result({"layer": layer, "images": len(idx["latents"]), "objective": objective,
             "branch": branch}, as_json, "feature visualizations")


@app.command()
def examples(
    run: str = typer.Argument(..., help="run directory"),
    layer: str = typer.Option(..., "--layer"),
    source: str | None = typer.Option(None, "--source", help="default: the store's source"),
    n_top: int = typer.Option(16, "--n-top"),
    latents: str | None = typer.Option(None, "--latents", help="latents to draw strips for"),
    n_strips: int = typer.Option(32, "--n-strips"),
    maps: bool = typer.Option(True, "--maps/--no-maps", help="latent heatmap overlay"),
    limit: int | None = typer.Option(None, "--limit", help="first N images"),
    batch_size: int = typer.Option(16, "--batch-size"),
    weights: str | None = WeightsOpt,
    device: str = DeviceOpt,
    show_progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = JsonOpt,
) -> None:
    """Top dataset examples of every latent, RF crops -> RUN/viz/examples/<layer>/."""
    from branchlens.stages.viz import examples_stage

    with _run_lock(run):
        idx = examples_stage(run, layer, source, n_top, _int_list(latents), n_strips, maps,
                             batch_size, limit, weights, device, show_progress=show_progress)
    _result({"layer": layer, "images": idx["n_images"], "strips": len(idx["latents"]),
             "receptive_field": idx["receptive_field"]}, as_json, "dataset examples")


@app.command()
def circuits(
    run: str = typer.Argument(..., help="run directory"),
    up: str = typer.Option(..., "--up", help="upstream block, e.g. mixed4a"),
    down: str = typer.Option(..., "--down", help="downstream block, e.g. mixed4b"),
    latents: str | None = typer.Option(None, "--latents", help="downstream latents"),
    n_latents: int = typer.Option(8, "--n-latents"),
    n_images: int = typer.Option(8, "--n-images", help="top images per latent"),
    flow_latents: int = typer.Option(64, "--flow-latents"),
    n_perm: int = typer.Option(1000, "--n-perm"),
    top_k: int = typer.Option(10, "--top-k"),
    ablate: int = typer.Option(4, "--ablate", help="latents for the branch-zeroing check"),
    source: str | None = typer.Option(None, "--source"),
    weights: str | None = WeightsOpt,
    device: str = DeviceOpt,
    show_progress: bool = typer.Option(True, "--progress/--no-progress"),
    as_json: bool = JsonOpt,
) -> None:
    """Latent-to-latent attribution, branch flow vs null, branch ablation -> RUN/viz/circuits/."""
    from branchlens.stages.viz import circuits_stage

    with _run_lock(run):
        doc = circuits_stage(run, up, down, _int_list(latents), n_latents, n_images,
                             flow_latents, n_perm, top_k, ablate, source, weights, device,
                             show_progress=show_progress)
    _result({"up": up, "down": down, "latents": len(doc["latents"]),
             "error_share_mean": round(doc["error_share_mean"], 4)}, as_json, "circuits")


@app.command()
def train(
    run_dir: str = typer.Argument(..., help="run folder holding store/; writes sae/<layer>/"),
    layers: str = typer.Option(..., "--layers", help="comma-separated, e.g. mixed4a,mixed4c"),
    expansion: int = typer.Option(16, "--expansion", help="latents per input channel"),
    k: int = typer.Option(32, "--k"),
    decoder: str = typer.Option("untied", "--decoder", help="untied (Gao et al.) | tied (paper)"),
    aux: bool | None = typer.Option(None, "--aux/--no-aux", help="AuxK (default: untied only)"),
    k_aux: int = typer.Option(512, "--k-aux"),
    dead_after: int | None = typer.Option(None, "--dead-after",
                                          help="vectors without firing = dead (default: "
                                               "half the training vectors, at most 10 M)"),
    loss: str = typer.Option("fvu", "--loss", help="fvu | paper"),
    b_pre_init: str = typer.Option("median", "--b-pre-init", help="median | zeros"),
    paper: bool = typer.Option(False, "--paper", help="the paper's SAE: tied, paper loss, "
                               "zero b_pre, no AuxK, lr 1e-3, no warmup/decay"),
    batch_size: int = typer.Option(4096, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr", help="default 4e-4 (1e-3 with --paper)"),
    epochs: float = typer.Option(10.0, "--epochs"),
    steps: int | None = typer.Option(None, "--steps", help="overrides --epochs"),
    warmup_steps: int = typer.Option(100, "--warmup-steps"),
    decay: str = typer.Option("linear", "--decay", help="none | linear | cosine"),
    seed: int = typer.Option(0, "--seed"),
    log_every: int = typer.Option(50, "--log-every"),
    ckpt_every: int = typer.Option(500, "--ckpt-every"),
    heldout_fraction: float = typer.Option(0.1, "--heldout-fraction"),
    from_npy: str | None = typer.Option(None, "--from-npy",
                                        help="train one layer from a [N, d] .npy (memory-"
                                             "mapped) instead of RUN/store"),
    variant: str = VariantOpt,
    device: str = DeviceOpt,
    no_progress: bool = typer.Option(False, "--no-progress"),
    restart: bool = typer.Option(False, "--restart",
                                 help="discard an SAE folder trained with other settings"),
    as_json: bool = JsonOpt,
) -> None:
    """Train TopK SAEs (one per layer) streaming from RUN/store; resumes after a kill.

    Multi-process: ``torchrun --standalone --nproc-per-node N -m branchlens train ...``.
    """
    from pathlib import Path

    import numpy as np

    from branchlens.schema import SAEOptions
    from branchlens.stages.train import train_layers
    from branchlens.train import ArrayBatches, TrainConfig, train_sae

    sae_kw = {"k": k, "decoder": decoder, "aux": aux, "k_aux": k_aux, "dead_after": dead_after,
              "loss": loss, "b_pre_init": b_pre_init}
    if paper:
        sae_kw |= {"decoder": "tied", "loss": "paper", "b_pre_init": "zeros", "aux": False}
        warmup_steps, decay = 0, "none"
    SAEOptions(expansion=expansion, **sae_kw)  # refuse bad values before reading any data
    default_lr = 1e-3 if paper else 4e-4
    cfg = TrainConfig(batch_size=batch_size, lr=default_lr if lr is None else lr, epochs=epochs,
                      steps=steps, warmup_steps=warmup_steps, decay=decay, seed=seed,
                      log_every=log_every, ckpt_every=ckpt_every,
                      heldout_fraction=heldout_fraction, progress=not no_progress,
                      device=device)
    names = [s.strip() for s in layers.split(",") if s.strip()]
    if from_npy is None:
        saes = train_layers(run_dir, names, sae_kw, cfg, expansion=expansion, restart=restart,
                            log=_info)
    else:
        from branchlens.sae import SAEConfig

        if len(names) != 1:
            raise typer.BadParameter("--from-npy trains exactly one layer")
        arr = np.load(from_npy, mmap_mode="r")
        try:
            sae_cfg = SAEConfig.for_layer(variant, names[0], expansion=expansion, **sae_kw)
        except KeyError:  # synthetic data under a name that is no layer: no branch layout
            sae_cfg = None
        if sae_cfg is None or arr.shape[1] != sae_cfg.d_in:
            sae_cfg = SAEConfig(d_in=arr.shape[1], n_latents=expansion * arr.shape[1],
                                layer=names[0], **sae_kw)
        data = ArrayBatches(arr, batch_size, seed)
        saes = {names[0]: train_sae(data, sae_cfg, cfg, Path(run_dir) / "sae" / names[0],
                                    meta={"source_npy": str(from_npy)}, restart=restart,
                                    log=_info)}
    for layer, sae in saes.items():
        _result({"layer": layer, "step": sae.meta["train"]["step"], **sae.meta["eval"]},
                as_json, "trained")


@app.command("export-sae")
def export_sae(
    run_dir: str = typer.Argument(..., help="run folder holding sae/<layer>/"),
    layer: str = typer.Option(..., "--layer"),
    fmt: str = typer.Option("saelens", "--format", help="saelens | paper (tied SAEs only)"),
    out: str | None = typer.Option(None, "--out", help="default: RUN/export/<layer>-<format>"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write a trained SAE for SAELens or the paper's notebook (input scale folded in)."""
    from branchlens.interop import export_run_sae

    path = export_run_sae(run_dir, layer, fmt, out)
    if as_json:
        _echo_json({"out": str(path), "layer": layer, "format": fmt})
    else:
        _out(f"{fmt} SAE of {layer}: {path}")


@app.command("import-sae")
def import_sae(
    source: str = typer.Argument(..., help="a SAELens folder, or the paper notebook's state "
                                           "dict (.pt/.pth/.safetensors)"),
    out_dir: str = typer.Argument(..., help="writes weights.safetensors + cfg.json here, e.g. "
                                            "RUN/sae/<layer>"),
    fmt: str = typer.Option("auto", "--format", help="auto | saelens | paper"),
    layer: str | None = typer.Option(None, "--layer", help="the layer the SAE reads; default: "
                                     "the file's (metadata.hook_name for SAELens)"),
    variant: str = VariantOpt,
    k: int | None = typer.Option(None, "--k", help="TopK k of a paper state dict"),
    force: bool = typer.Option(False, "--force", help="replace an SAE already in OUT_DIR"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Convert a SAELens TopK SAE or a paper-style checkpoint into a branchlens SAE."""
    from branchlens.interop import import_sae as run_import
    from branchlens.interop import save_imported

    sae = run_import(source, fmt, k=k, layer=layer, variant=variant if layer else None)
    save_imported(sae, out_dir, source, force=force)
    summary = {"out": out_dir, **{key: getattr(sae.cfg, key)
                                  for key in ("d_in", "n_latents", "k", "decoder")}}
    if as_json:
        _echo_json(summary)
    else:
        _out(f"imported {source} -> {out_dir} (d_in {sae.cfg.d_in}, "
                   f"{sae.cfg.n_latents} latents, k {sae.cfg.k})")


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="run directory (RUN/)"),
    out: str | None = typer.Option(None, "--out", help="default: RUN/report/index.html"),
    cards_per_layer: int = typer.Option(48, "--cards-per-layer",
                                        help="gallery cards per layer (plus rendered latents)"),
    as_json: bool = JsonOpt,
) -> None:
    """One self-contained HTML report of a run (works on partial runs)."""
    from branchlens.schema import check_block
    from branchlens.stages.report import build_report

    check_block("report", {"cards_per_layer": cards_per_layer})
    with _run_lock(run_dir):
        path = build_report(run_dir, out, cards_per_layer=cards_per_layer)
    size = path.stat().st_size
    if as_json:
        _echo_json({"report": str(path), "bytes": size})
    else:
        _out(f"report: {path} ({size / 1e6:.1f} MB)")


@app.command("run")
def run_cmd(
    source: str | None = typer.Argument(None, help="images; default: the preset's source"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    preset: str | None = typer.Option(None, "--preset",
                                      help="demo | sample16x | paper (default: the config "
                                           "file's, else demo); see `branchlens presets`"),
    variant: str | None = typer.Option(None, "--variant", help="override the preset's"),
    weights: str | None = WeightsOpt,
    device: str = DeviceOpt,
    seed: int | None = typer.Option(None, "--seed"),
    paper_compat: bool = typer.Option(False, "--paper-compat",
                                      help="the paper's [0,1] input scaling bug"),
    stages: str | None = typer.Option(None, "--stages", help="comma list; default: all"),
    force: bool = typer.Option(False, "--force", help="re-run stages even if up to date"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.steps=1000"),
    config: Path | None = typer.Option(None, "--config",
                                       help="TOML or JSON file shaped like a preset (`branchlens "
                                            "presets NAME` prints one), or a run's run.json to "
                                            "repeat it; applied before --set"),
    as_json: bool = typer.Option(False, "--json", help="print the run record's summary as JSON"),
) -> None:
    """Harvest → train → analyze → visualize/examples/circuits → report, resumable."""
    from branchlens.config import ConfigError, load_config_file, parse_set
    from branchlens.pipeline import run

    overrides: dict[str, Any] = load_config_file(config) if config is not None else {}
    for item in set_:
        block, name, value = parse_set(item)
        if not isinstance(overrides.get(block, {}), dict):
            raise ConfigError(f"{config}: {block} must be a mapping")
        overrides.setdefault(block, {})[name] = value
    record = run(out, preset=preset, source=source, weights=weights, device=device,
                 variant=variant, paper_compat=paper_compat, seed=seed, overrides=overrides,
                 stages=[s.strip() for s in stages.split(",")] if stages else None, force=force,
                 log=_info)
    if rank() != 0:
        return
    total = sum(s.get("seconds", 0) for s in record["stages"].values())
    report = out / "report" / "index.html"
    if as_json:
        _echo_json({"run": str(out), "seconds": round(total, 2),
                    "stages": {k: v.get("status") for k, v in record["stages"].items()},
                    "report": str(report.resolve()) if report.is_file() else None})
        return
    _out(f"run {out} finished ({total:.0f}s of stage time)")
    if report.is_file():
        _out(f"report: {report.resolve()}")


@app.command()
def presets(
    name: str | None = typer.Argument(None, help="one preset, printed as a TOML config file"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The presets of `branchlens run` and their values (edit one into a --config file)."""
    from branchlens.config import ConfigError, to_toml
    from branchlens.pipeline import PRESET_NOTES, PRESETS

    if name is not None and name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    chosen = {name: PRESETS[name]} if name else PRESETS
    if as_json:
        _echo_json({k: {"preset": k, **v} for k, v in chosen.items()})
        return
    for i, (key, values) in enumerate(chosen.items()):
        if i:
            _out("")
        _out(f"# preset {key}: {PRESET_NOTES.get(key, '')}")
        _out(to_toml({"preset": key, **values}), nl=False)


for _cmd in app.registered_commands:
    _cmd.callback = _friendly(_cmd.callback)
