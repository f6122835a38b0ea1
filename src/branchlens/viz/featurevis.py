"""Batched feature visualization of SAE latents (and channels/neurons for comparison).

``visualize_latents`` optimises one image per latent, ``batch_size`` latents per forward pass;
the batch is the whole speed-up on CPU and GPU alike (see ``benchmarks/featurevis.py``).
Outputs are PNGs plus a JSON index recording the objective, config and provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from branchlens.artifacts import atomic_path, provenance, write_json
from branchlens.progress import progress
from branchlens.viz import objectives as O
from branchlens.viz.latents import SAELike, encoder_affine, sae_d_in
from branchlens.viz.render import RenderConfig, render

OBJECTIVES = ("latent", "latent_mean", "direction", "direction_mean")


@dataclass
class FeatureVis:
    latents: list[int]
    images: Tensor  # [N, 3, H, W] in [0, 1]
    values: Tensor  # [N] objective on the final images
    objective: str
    branch: str | None


def latent_objective(
    sae: SAELike, layer: str, latents: Sequence[int], kind: str = "latent",
    branch: str | None = None, variant=None, encoder=None,
) -> O.Objective:
    """``latent``: encoder pre-activation at the centre; ``direction``: the paper's
    cosine-weighted decoder direction at the centre; ``*_mean``: averaged over positions."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {kind!r}")
    position = "mean" if kind.endswith("_mean") else "center"
    if kind.startswith("latent"):
        enc = encoder if encoder is not None else encoder_affine(sae, sae_d_in(sae))
        return O.sae_latent(enc, layer, latents, position, branch, variant)
    return O.sae_direction(sae, layer, latents, position, branch, variant)


def visualize_latents(
    model: nn.Module,
    sae: SAELike,
    layer: str,
    latents: Sequence[int],
    *,
    objective: str = "latent",
    branch: str | None = None,
    cfg: RenderConfig | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> FeatureVis:
    """One optimised image per latent, ``batch_size`` latents optimised together."""
    cfg = cfg or RenderConfig()
    latents = [int(i) for i in latents]
    enc = encoder_affine(sae, sae_d_in(sae)) if objective.startswith("latent") else None
    images, values = [], []
    chunks = [latents[i:i + batch_size] for i in range(0, len(latents), batch_size)]
    with progress(cfg.steps * len(chunks), f"featurevis {layer}", "step",
                  disable=not show_progress) as bar:
        for c, chunk in enumerate(chunks):
            obj = latent_objective(sae, layer, chunk, objective, branch, model.variant, enc)
            res = render(model, obj, len(chunk), replace(cfg, seed=cfg.seed + c), bar)
            images.append(res.images)
            values.append(res.values)
    return FeatureVis(latents, torch.cat(images), torch.cat(values), objective, branch)


def to_pil(image01: Tensor) -> Image.Image:
    a = (image01.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    return Image.fromarray(a.astype(np.uint8), "RGB")


def save_png(img: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_featurevis(vis: FeatureVis, out_dir: str | Path, layer: str, cfg: RenderConfig,
                    meta: dict | None = None) -> dict:
    """PNG per latent (``<layer>_<latent>[_<branch>].png``) and ``index.json``; returns index."""
    out = Path(out_dir)
    suffix = f"_{vis.branch}" if vis.branch else ""
    entries = []
    for lat, img, val in zip(vis.latents, vis.images, vis.values, strict=True):
        name = f"{layer}_{lat:05d}_{vis.objective}{suffix}.png"
        save_png(to_pil(img), out / name)
        entries.append({"latent": lat, "file": name, "objective_value": float(val)})
    index = {"layer": layer, "objective": vis.objective, "branch": vis.branch,
             "render": cfg.to_dict(), "latents": entries, **provenance(**(meta or {}))}
    idx_path = out / f"index_{vis.objective}{suffix}.json"
    old = {}
    if idx_path.is_file():
        import json

        old = {e["latent"]: e for e in json.loads(idx_path.read_text()).get("latents", [])}
    old.update({e["latent"]: e for e in entries})
    index["latents"] = [old[k] for k in sorted(old)]
    write_json(idx_path, index)
    return index
