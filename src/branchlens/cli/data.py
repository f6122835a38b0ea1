"""The network and its images: ``info``, ``classify`` and ``harvest`` (into a store)."""

from __future__ import annotations

import typer

from branchlens.cli.common import (
    DEVICE_HELP,
    SOURCE,
    VARIANT_HELP,
    WEIGHTS_HELP,
    ImageKeyOpt,
    LabelKeyOpt,
    VariantOpt,
    command,
    echo_json,
    emit,
    rank,
)
from branchlens.cli.defaults import Home

CLASSIFY = Home("branchlens.classify:iter_predictions")
HARVEST = Home("branchlens.settings:HarvestConfig")  # the store's settings
STAGE = Home("branchlens.stages.harvest:harvest")  # the rest of the harvest call
SOURCE_HELP = "folder, file list, embedded[:N], hf:, wds:"


@command()
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
    summary = {"variant": v.name, "description": v.description, "parameters": n_params,
               "num_classes": v.num_classes, "layers": layers}
    if as_json:
        echo_json(summary)
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


@command()
def classify(
    source: str = typer.Argument("embedded", help=SOURCE_HELP),
    variant: str = VariantOpt,
    weights: str | None = Home("branchlens.weights:load_model").opt(
        "weights", "--weights", help=WEIGHTS_HELP),
    device: str = Home("branchlens.devices:resolve_device").opt("device", "--device",
                                                                 help=DEVICE_HELP),
    batch_size: int = CLASSIFY.opt("batch_size", "--batch-size"),
    workers: int = CLASSIFY.opt("workers", "--workers"),
    paper_compat: bool = CLASSIFY.opt("paper_compat", "--paper-compat",
                                      help="feed [0,1] RGB like the paper's harvest"),
    show: int = typer.Option(10, "--show", help="predictions to print (-1: all)"),
    limit: int | None = SOURCE.opt("limit", "--limit", help="first N images of SOURCE"),
    image_key: str | None = ImageKeyOpt,
    label_key: str | None = LabelKeyOpt,
    as_json: bool = typer.Option(False, "--json",
                                 help="JSON Lines on stdout: one object per shown prediction "
                                      "(--show), then one summary object"),
) -> None:
    """Top-5 predictions (with class names) and accuracy when labels are known."""
    from branchlens.classify import classify as run_classify
    from branchlens.classify import format_prediction
    from branchlens.data import open_source, with_columns
    from branchlens.devices import resolve_device
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
    shown = res.predictions[: None if show < 0 else show]
    if as_json:
        for p in shown:
            echo_json({"image_id": p.image_id, "label": p.label, "top5": p.top5,
                       "probs": [round(q, 4) for q in p.probs]})
        echo_json({k: summary[k] for k in ("n", "top1", "top5", "skipped")})
        return
    for p in shown:
        emit(format_prediction(p, model.variant))
    emit(res.skips.summary())
    if summary["labelled"]:
        n = summary["labelled"]
        emit(f"top-1 {summary['top1']}/{n}  top-5 {summary['top5']}/{n}")
    if winfo.random:
        emit("WARNING: random weights — predictions are meaningless", fg="red")


@command()
def harvest(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    layers: str = HARVEST.opt("layers", "--layers", convert=",".join,
                              help="comma-separated named outputs (blocks, branches, ...)"),
    out: str = typer.Option(..., "--out", help="store folder, e.g. RUN/store"),
    variant: str = STAGE.opt("variant", "--variant", help=VARIANT_HELP),
    weights: str | None = STAGE.opt("weights", "--weights", help=WEIGHTS_HELP),
    device: str = STAGE.opt("device", "--device", help=DEVICE_HELP),
    sampling: str = HARVEST.opt("sampling", "--sampling", help="norm | uniform | all"),
    samples_per_image: int = HARVEST.opt("samples_per_image", "--samples-per-image"),
    aligned: bool = HARVEST.opt("aligned", "--aligned",
                                help="same positions for layers of equal grid size"),
    dtype: str = HARVEST.opt("dtype", "--dtype", help="fp16 | fp32"),
    batch_size: int = HARVEST.opt("batch_size", "--batch-size"),
    workers: int = STAGE.opt("workers", "--workers", help="decode processes per rank"),
    seed: int = STAGE.opt("seed", "--seed"),
    shard_size: int = HARVEST.opt("shard_size", "--shard-size", help="images per shard"),
    paper_compat: bool = STAGE.opt("paper_compat", "--paper-compat",
                                     help="feed [0,1] RGB like the paper's harvest"),
    limit: int | None = HARVEST.opt("limit", "--limit", help="first N images of SOURCE"),
    flip: bool = HARVEST.opt("flip", "--flip", help="add every image's mirror as a 2nd view"),
    image_key: str | None = ImageKeyOpt,
    label_key: str | None = LabelKeyOpt,
    show_progress: bool = STAGE.opt("show_progress", "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Activations of many layers in one pass into a resumable store (torchrun: ranks)."""
    from branchlens.data import with_columns
    from branchlens.stages.harvest import harvest as run_harvest

    res = run_harvest(with_columns(source, image_key, label_key), out, layers,
                      variant=variant, weights=weights, device=device, sampling=sampling,
                      samples_per_image=samples_per_image, aligned=aligned, dtype=dtype,
                      batch_size=batch_size, workers=workers, seed=seed, shard_size=shard_size,
                      paper_compat=paper_compat, limit=limit, flip=flip,
                      show_progress=show_progress)
    if res.manifest is None:
        return
    c = res.manifest["counts"]
    if as_json:
        echo_json({"store": str(res.path), "images": c["images"],
                   "skipped": c["images_skipped"], "vectors": c["vectors"],
                   "resumed_images": res.resumed_images, "world_size": res.world_size})
        return
    emit(f"store {res.path}: {c['images']} images ({c['images_skipped']} skipped, "
        f"{res.resumed_images} already done), world size {res.world_size}")
    for layer, n in c["vectors"].items():
        emit(f"  {layer}: {n} vectors")
    if res.manifest["skips"]["counts"]:
        emit(f"  skips: {res.manifest['skips']['counts']}")
