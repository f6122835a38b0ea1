"""The harvest stage: activations of a run's layers over an image source, into ``RUN/store``.

``harvest`` is the entry point of ``branchlens harvest`` (a source spec and a store folder):
it checks the settings, opens the source, loads the network and joins the torchrun ranks, then
:func:`branchlens.harvest.collect.collect` writes the store. ``harvest_run`` is what
``branchlens run`` calls: a store harvested under other settings or from files that changed
since is discarded (only the store's own files) and harvested again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from branchlens.artifacts import discard_outputs
from branchlens.data import open_source
from branchlens.distributed import Dist
from branchlens.harvest.collect import (
    DEFAULT_LAYERS,
    HarvestResult,
    check_settings,
    collect,
    image_count,
    parse_layers,
)
from branchlens.model import InceptionV1
from branchlens.run import Run
from branchlens.settings import HarvestConfig
from branchlens.store import STORE_FILES, SourceChanged, StoreConfigMismatch, StoreError
from branchlens.threads import heavy_stage
from branchlens.variants import DEFAULT_VARIANT, get_variant


@heavy_stage("harvest")
def harvest(
    source: Any,
    out: str | Path,
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    *,
    variant: str = DEFAULT_VARIANT,
    weights: str | Path | None = None,
    device: str = "auto",
    sampling: str = HarvestConfig.sampling,  # the harvest block's defaults (settings.py)
    samples_per_image: int = HarvestConfig.samples_per_image,
    aligned: bool = HarvestConfig.aligned,
    dtype: str = HarvestConfig.dtype,
    batch_size: int = HarvestConfig.batch_size,
    workers: int = 1,
    seed: int = 0,
    shard_size: int = HarvestConfig.shard_size,
    paper_compat: bool = False,
    limit: int | None = HarvestConfig.limit,
    flip: bool = HarvestConfig.flip,
    model: InceptionV1 | None = None,
    show_progress: bool = True,
    channels_last: bool = True,
) -> HarvestResult:
    """Harvest ``layers`` of every image of ``source`` into the store at ``out`` (resumable).

    ``shard_size`` is in images; ``flip`` adds every image's mirror as a second view.
    ``model`` replaces loading ``weights`` (tests, notebooks); it is moved to ``device`` (and to
    channels_last memory format) in place. Bad settings and sources fail before any weights
    load. Raises :class:`~branchlens.store.StoreError` subclasses with actionable messages.
    """
    from branchlens.devices import resolve_device
    from branchlens.weights import load_model

    layers = parse_layers(layers)
    check_settings(variant if model is None else model.variant, layers, sampling=sampling,
                   samples_per_image=samples_per_image, dtype=dtype, batch_size=batch_size,
                   shard_size=shard_size, workers=workers, limit=limit)
    v = get_variant(variant if model is None else model.variant)
    src = open_source(source, v, seed=seed, flip=flip, limit=limit)  # errors before weights
    if image_count(src, limit) == 0:
        raise StoreError(f"image source {source!r} has no images "
                         f"({getattr(src, 'description', source)}); nothing to harvest")
    comm = Dist()
    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and comm.world > 1 and dev.index is None:
            dev = torch.device("cuda", comm.local_rank)
        if model is None:
            model, winfo = load_model(v, weights, dev, seed=seed)
            wdict = winfo.to_dict()
        else:
            model = model.to(dev).eval()
            wdict = {"variant": v.name, "source": "in-memory", "path": None, "sha256": None,
                     "seed": None, "random": False}
        return collect(model, src, out, layers, weights=wdict, device=dev, comm=comm,
                       sampling=sampling, samples_per_image=samples_per_image, aligned=aligned,
                       dtype=dtype, batch_size=batch_size, workers=workers, seed=seed,
                       shard_size=shard_size, paper_compat=paper_compat, limit=limit,
                       show_progress=show_progress, channels_last=channels_last)
    finally:
        comm.close()


def harvest_run(run_dir: str | Path, source: Any, settings: HarvestConfig, *, variant: str,
                seed: int, paper_compat: bool, weights: str | None, device: str,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Harvest into ``RUN/store`` under the run's ``harvest`` block; returns the counts the run
    record keeps (over all ranks under torchrun)."""
    store_dir = Run(run_dir).store_dir

    def go() -> HarvestResult:
        return harvest(source, store_dir, settings.layers, variant=variant, weights=weights,
                       device=device, sampling=settings.sampling,
                       samples_per_image=settings.samples_per_image, aligned=settings.aligned,
                       dtype=settings.dtype, batch_size=settings.batch_size, seed=seed,
                       paper_compat=paper_compat, flip=settings.flip,
                       shard_size=settings.shard_size, limit=settings.limit,
                       show_progress=False)
    try:
        res = go()
    except StoreConfigMismatch as e:  # other settings or other files: never mixed into the new
        why = (f"the image source changed ({e.change})" if isinstance(e, SourceChanged)
               else "harvest settings changed")
        discard_outputs(store_dir, log, why, owned=STORE_FILES, keep=(".lock",),
                        refuse_foreign=True)
        res = go()
    manifest = res.manifest or {}
    c = manifest.get("counts")
    dup = {"duplicates": manifest["duplicates"]["images"]} if manifest.get("duplicates") else {}
    if c is None or res.world_size == 1:
        return {"images": res.images, "vectors": res.vectors, "skipped": res.skips.total, **dup}
    return {"images": c["images"], "vectors": sum(c["vectors"].values()),  # all ranks
            "skipped": c["images_skipped"], "world_size": res.world_size, **dup}
