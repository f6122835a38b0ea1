"""SAEs: ``train`` (from a run's store or a .npy), ``export-sae`` and ``import-sae``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from branchlens.cli.common import (
    JsonOpt,
    RunDeviceOpt,
    VariantOpt,
    command,
    echo_json,
    emit,
    names,
    result,
    say,
)
from branchlens.cli.defaults import Home
from branchlens.layout import RunLayout

if TYPE_CHECKING:
    from branchlens.sae import TopKSAE
    from branchlens.settings import SAEOptions, TrainConfig

SAE = Home("branchlens.settings:SAEOptions")
TRAIN = Home("branchlens.settings:TrainConfig")
STAGE = Home("branchlens.stages.train:train_layers")
IMPORT = Home("branchlens.interop:import_sae")
# What --paper takes from the paper preset: its architecture and schedule, not its sizes.
PAPER_KEYS = {"sae": ("decoder", "loss", "b_pre_init", "aux"),
              "train": ("lr", "warmup_steps", "decay")}


@command()
def train(
    run_dir: str = typer.Argument(..., help="run folder holding store/; writes sae/<layer>/"),
    layers: str = typer.Option(..., "--layers", help="comma-separated, e.g. mixed4a,mixed4c"),
    expansion: int = SAE.opt("expansion", "--expansion", help="latents per input channel"),
    k: int = SAE.opt("k", "--k"),
    decoder: str = SAE.opt("decoder", "--decoder", help="untied (Gao et al.) | tied (paper)"),
    aux: bool | None = SAE.opt("aux", "--aux/--no-aux", show_default=False,
                                help="AuxK (default: untied only)"),
    k_aux: int = SAE.opt("k_aux", "--k-aux"),
    dead_after: int | None = SAE.opt("dead_after", "--dead-after",
                                     help="vectors without firing = dead (default: half the "
                                          "training vectors, at most 10 M)"),
    loss: str = SAE.opt("loss", "--loss", help="fvu | paper"),
    b_pre_init: str = SAE.opt("b_pre_init", "--b-pre-init", help="median | zeros"),
    paper: bool = typer.Option(False, "--paper", help="the paper preset's "
                               + ", ".join(PAPER_KEYS["sae"] + PAPER_KEYS["train"])
                               + " (branchlens presets paper)"),
    batch_size: int = TRAIN.opt("batch_size", "--batch-size"),
    lr: float | None = typer.Option(None, "--lr", help="default: train.lr (the paper "
                                    "preset's with --paper)"),
    epochs: float = TRAIN.opt("epochs", "--epochs"),
    steps: int | None = TRAIN.opt("steps", "--steps", help="overrides --epochs"),
    warmup_steps: int = TRAIN.opt("warmup_steps", "--warmup-steps"),
    decay: str = TRAIN.opt("decay", "--decay", help="none | linear | cosine"),
    seed: int = TRAIN.opt("seed", "--seed"),
    log_every: int = TRAIN.opt("log_every", "--log-every"),
    ckpt_every: int = TRAIN.opt("ckpt_every", "--ckpt-every"),
    heldout_fraction: float = TRAIN.opt("heldout_fraction", "--heldout-fraction"),
    from_npy: str | None = typer.Option(None, "--from-npy",
                                        help="train one layer from a [N, d] .npy (memory-"
                                             "mapped) instead of RUN/store"),
    variant: str = VariantOpt,
    device: str = RunDeviceOpt,
    progress: bool = TRAIN.opt("progress", "--progress/--no-progress"),
    # no [default] shown (an off flag shows none anyway), so --help does not import the stage
    restart: bool = STAGE.opt("restart", "--restart", show_default=False,
                              help="discard an SAE folder trained with other settings"),
    as_json: bool = JsonOpt,
) -> None:
    """Train TopK SAEs (one per layer) streaming from RUN/store; resumes after a kill.

    Multi-process: ``torchrun --standalone --nproc-per-node N -m branchlens train ...``.
    """
    from branchlens.schema import library_check
    from branchlens.settings import SAEOptions, TrainConfig

    sae_kw = dict(expansion=expansion, k=k, decoder=decoder, aux=aux, k_aux=k_aux,
                  dead_after=dead_after, loss=loss, b_pre_init=b_pre_init)
    train_kw = dict(batch_size=batch_size, epochs=epochs, steps=steps,
                    warmup_steps=warmup_steps, decay=decay, seed=seed, log_every=log_every,
                    ckpt_every=ckpt_every, heldout_fraction=heldout_fraction,
                    progress=progress, device=device)
    if lr is not None:
        train_kw["lr"] = lr
    if paper:
        from branchlens.presets import PRESETS

        sae_kw |= {key: PRESETS["paper"]["sae"][key] for key in PAPER_KEYS["sae"]}
        train_kw |= {key: PRESETS["paper"]["train"][key] for key in PAPER_KEYS["train"]
                     if key != "lr" or lr is None}
    sae = SAEOptions(**sae_kw)  # refuse bad values before reading any data
    library_check("sae", sae)
    cfg = TrainConfig(**train_kw)
    layer_names = names(layers) or []
    if from_npy is None:
        from branchlens.stages.train import train_layers

        saes = train_layers(run_dir, layer_names, sae.sae_kwargs(), cfg,
                            expansion=sae.expansion, restart=restart, log=say)
    else:
        if len(layer_names) != 1:
            raise typer.BadParameter("--from-npy trains exactly one layer")
        saes = {layer_names[0]: _train_npy(run_dir, layer_names[0], from_npy, variant, sae,
                                           cfg, restart)}
    for layer, trained in saes.items():
        result({"layer": layer, "step": trained.meta["train"]["step"],
                **trained.meta["eval"]}, as_json, "trained")


def _train_npy(run_dir: str, layer: str, path: str, variant: str, sae: SAEOptions,
               cfg: TrainConfig, restart: bool) -> TopKSAE:
    """One SAE from a memory-mapped ``[N, d]`` array into ``RUN/sae/<layer>``."""

    import numpy as np

    from branchlens.sae import SAEConfig
    from branchlens.train import ArrayBatches, train_sae

    arr = np.load(path, mmap_mode="r")
    try:
        sae_cfg = SAEConfig.for_layer(variant, layer, expansion=sae.expansion,
                                      **sae.sae_kwargs())
    except KeyError:  # synthetic data under a name that is no layer: no branch layout
        sae_cfg = None
    if sae_cfg is None or arr.shape[1] != sae_cfg.d_in:
        sae_cfg = SAEConfig(d_in=arr.shape[1], n_latents=sae.expansion * arr.shape[1],
                            layer=layer, **sae.sae_kwargs())
    data = ArrayBatches(arr, cfg.batch_size, cfg.seed)
    return train_sae(data, sae_cfg, cfg, RunLayout(run_dir).sae_dir(layer),
                     meta={"source_npy": str(path)}, restart=restart, log=say)


@command("export-sae")
def export_sae(
    run_dir: str = typer.Argument(..., help="run folder holding sae/<layer>/"),
    layer: str = typer.Option(..., "--layer"),
    fmt: str = typer.Option("saelens", "--format", help="saelens | paper (tied SAEs only)"),
    out: str | None = Home("branchlens.interop:export_run_sae").opt(
        "out", "--out", help="default: RUN/export/<layer>-<format>"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write a trained SAE for SAELens or the paper's notebook (input scale folded in)."""
    from branchlens.interop import export_run_sae

    path = export_run_sae(run_dir, layer, fmt, out=out)
    if as_json:
        echo_json({"out": str(path), "layer": layer, "format": fmt})
    else:
        emit(f"{fmt} SAE of {layer}: {path}")


@command("import-sae")
def import_sae(
    source: str = typer.Argument(..., help="a SAELens folder, or the paper notebook's state "
                                           "dict (.pt/.pth/.safetensors)"),
    out_dir: str = typer.Argument(..., help="writes weights.safetensors + cfg.json here, e.g. "
                                            "RUN/sae/<layer>"),
    fmt: str = IMPORT.opt("fmt", "--format", help="auto | saelens | paper"),
    layer: str | None = IMPORT.opt("layer", "--layer", help="the layer the SAE reads; default: "
                                   "the file's (metadata.hook_name for SAELens)"),
    variant: str = VariantOpt,
    k: int | None = IMPORT.opt("k", "--k", help="TopK k of a paper state dict"),
    force: bool = Home("branchlens.interop:save_imported").opt(
        "force", "--force", help="replace an SAE already in OUT_DIR"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Convert a SAELens TopK SAE or a paper-style checkpoint into a branchlens SAE."""
    from branchlens.interop import import_sae as run_import
    from branchlens.interop import save_imported

    sae = run_import(source, fmt, k=k, layer=layer, variant=variant if layer else None)
    save_imported(sae, out_dir, source, force=force)
    if as_json:
        echo_json({"out": out_dir, **{key: getattr(sae.cfg, key)
                                      for key in ("d_in", "n_latents", "k", "decoder")}})
    else:
        emit(f"imported {source} -> {out_dir} (d_in {sae.cfg.d_in}, "
            f"{sae.cfg.n_latents} latents, k {sae.cfg.k})")
