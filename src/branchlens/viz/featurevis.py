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
UNIT_OBJECTIVES = ("channel", "neuron")  # the network's own units, as Distill studied them


@dataclass
class FeatureVis:
    latents: list[int]
    images: Tensor  # [N, 3, H, W] in [0, 1]
    values: Tensor  # [N] objective on the final images
    objective: str
    branch: str | None


def check_targets(
    layer: str, targets: Sequence[int], objective: str, branch: str | None, variant,
    n_units: int, dead: Tensor | None = None,
) -> None:
    """One-line errors, with the valid choices, before any rendering starts: an unknown
    objective, a branch the layer does not have, a target out of range or a dead latent."""
    from branchlens.variants import branch_slices

    if objective not in OBJECTIVES + UNIT_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of "
                         f"{', '.join(OBJECTIVES + UNIT_OBJECTIVES)}")
    unit = "channel" if objective in UNIT_OBJECTIVES else "latent"
    if branch is not None:
        if unit == "channel":
            raise ValueError(f"--branch restricts an SAE objective; a {objective} objective "
                             "is one channel, which already lies in one branch")
        names = list(branch_slices(variant, layer))
        if branch not in names:
            raise ValueError(f"{layer} has no branch {branch!r}; branches: {', '.join(names)}")
    if not targets:
        raise ValueError(f"no {unit}s to visualize")
    bad = [t for t in targets if not 0 <= int(t) < n_units]
    if bad:
        raise ValueError(f"{unit} {bad[0]} is out of range for {layer}: valid {unit}s are "
                         f"0..{n_units - 1}")
    if dead is not None and unit == "latent":
        gone = [int(t) for t in targets if bool(dead[int(t)])]
        if gone:
            alive = (~dead).nonzero().squeeze(1)[:5].tolist()
            raise ValueError(f"latent {gone[0]} of {layer} is dead (it stopped firing in "
                             f"training; no picture can show it); alive ones include {alive}")


def unit_objective(layer: str, channels: Sequence[int], kind: str = "channel") -> O.Objective:
    """``channel``: mean over positions; ``neuron``: the centre position."""
    return O.channel(layer, list(channels)) if kind == "channel" else O.neuron(layer,
                                                                                list(channels))


def visualize_units(
    model: nn.Module, layer: str, channels: Sequence[int], *, objective: str = "channel",
    cfg: RenderConfig | None = None, batch_size: int = 16, show_progress: bool = True,
) -> FeatureVis:
    """One optimised image per channel of ``layer`` (channel or neuron objective)."""
    cfg = cfg or RenderConfig()
    channels = [int(c) for c in channels]
    chunks = [channels[i:i + batch_size] for i in range(0, len(channels), batch_size)]
    images, values = [], []
    with progress(cfg.steps * len(chunks), f"featurevis {layer} {objective}s", "step",
                  disable=not show_progress) as bar:
        for c, chunk in enumerate(chunks):
            res = render(model, unit_objective(layer, chunk, objective), len(chunk),
                         replace(cfg, seed=cfg.seed + c), bar)
            images.append(res.images)
            values.append(res.values)
    return FeatureVis(channels, torch.cat(images), torch.cat(values), objective, None)


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
