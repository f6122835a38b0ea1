"""The train stage: one SAE per layer of a run's activation store, into ``RUN/sae/<layer>/``.

``train_layers`` opens ``RUN/store``, splits its images into training and held-out ones and
calls :func:`branchlens.train.loop.train_sae` per layer (which resumes a killed run);
``train_run`` is what ``branchlens run`` calls: it first discards an SAE folder that must be
trained from scratch (``--force``, or weights that are not the ones this run trained).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from branchlens.artifacts import discard_outputs
from branchlens.run import Run
from branchlens.sae import SAEConfig, TopKSAE
from branchlens.store import ActivationStore, StoreError
from branchlens.train.checkpoint import TRAIN_OUTPUTS
from branchlens.train.config import TrainConfig
from branchlens.train.loop import train_sae
from branchlens.train.sampling import StoreBatches


def train_layers(run_dir: str | Path, layers: list[str], sae_kw: dict[str, Any],
                 cfg: TrainConfig, expansion: int = 16, restart: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, TopKSAE]:
    """Train one SAE per layer from ``RUN/store`` into ``RUN/sae/<layer>/``."""
    if expansion < 1:
        raise ValueError(f"expansion must be >= 1 (latents per input channel), got {expansion}")
    run = Run(run_dir)
    store = ActivationStore.open(run.store_dir)
    variant = store.manifest["variant"]
    counts = store.manifest["counts"]
    if not counts.get("images_stored", counts["images"]):
        raise StoreError(f"store {run.store_dir} holds no usable image ({counts['images']} "
                         f"given, all skipped: {store.manifest['skips']['counts']}); harvest "
                         "other images")
    missing = [x for x in layers if x not in store.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the store; it has {store.layers}")
    train_img, held_img = store.split_images(cfg.heldout_fraction, cfg.seed)
    out = {}
    for layer in layers:
        sae_cfg = SAEConfig.for_layer(variant, layer, expansion=expansion, **sae_kw)
        if sae_cfg.d_in != store.dim(layer):
            raise ValueError(f"store has d={store.dim(layer)} for {layer}, variant says "
                             f"{sae_cfg.d_in}")
        data = StoreBatches(store, layer, cfg.batch_size, cfg.seed, images=train_img)
        held = (StoreBatches(store, layer, cfg.batch_size, cfg.seed, images=held_img,
                             shuffle=False, drop_last=False) if len(held_img) else None)
        meta = {"store_hash": store.content_hash(), "store": str(run.store_dir),
                "train_images": len(train_img), "heldout_images": len(held_img)}
        out[layer] = train_sae(data, sae_cfg, cfg, run.sae_dir(layer), held, meta,
                               restart=restart, log=log)
    return out


def train_run(run_dir: str | Path, layers: list[str], sae_kw: dict[str, Any], cfg: TrainConfig,
              expansion: int, *, force: bool = False, changed: Collection[str] = (),
              log: Callable[[str], None] = print) -> dict[str, TopKSAE]:
    """:func:`train_layers` with ``restart``, after discarding the SAE folders to train from
    scratch: every one under ``force``, else those whose weights (run-relative path in
    ``changed``) are not the ones this run trained."""
    run = Run(run_dir)
    for layer in layers:
        weights = run.sae_dir(layer) / "weights.safetensors"
        if force or weights.relative_to(run.path).as_posix() in changed:
            discard_outputs(weights.parent, log, "--force" if force else
                            f"{layer}'s SAE is not the one this run trained", owned=TRAIN_OUTPUTS)
    return train_layers(run_dir, layers, sae_kw, cfg, expansion=expansion, restart=True, log=log)
