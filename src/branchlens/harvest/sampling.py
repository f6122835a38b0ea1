"""Which positions of an image are stored: ``norm`` (N draws with replacement, probability
proportional to the channel vector's L2 norm, as in the paper), ``uniform`` (N distinct
positions) or ``all``. An image's random stream depends only on (seed, image index, layer or
grid), never on batch composition or rank; ``aligned`` layers of one grid share positions."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger("branchlens.harvest")

SAMPLING_METHODS = ("norm", "uniform", "all")
NON_FINITE = "non_finite_activation"  # skip reasons of images whose vectors cannot be stored
FP16_OVERFLOW = "fp16_overflow"


def image_rng(seed: int, image_index: int, key: str) -> np.random.Generator:
    """The random stream of one image for one layer (or aligned grid) key."""
    return np.random.default_rng([seed, image_index, zlib.crc32(key.encode())])


def sample_positions(norms: np.ndarray, method: str, n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Flat positions (int64) into a grid whose per-position channel norms are ``norms``.

    ``norm`` falls back to uniform draws (with replacement) when every norm is zero.
    """
    norms = np.asarray(norms, np.float64).ravel()
    size = norms.size
    if method == "all":
        return np.arange(size, dtype=np.int64)
    if method == "uniform":
        if n > size:
            raise ValueError(f"uniform sampling of {n} positions from a grid of {size}")
        return rng.choice(size, n, replace=False).astype(np.int64)
    if method == "norm":
        total = norms.sum()
        p = norms / total if total > 0 and np.isfinite(total) else None
        return rng.choice(size, n, replace=True, p=p).astype(np.int64)
    raise ValueError(f"unknown sampling {method!r}; choose from {SAMPLING_METHODS}")


def cap_samples(n: int, layers: Sequence[str], shapes: dict) -> int:
    """Norm sampling draws with replacement: more draws than grid positions would store each
    position many times over, so ``n`` is capped at the smallest grid (with a warning)."""
    smallest = min(shapes[k][1] * shapes[k][2] for k in layers)
    if n > smallest:
        import warnings

        warnings.warn(f"--samples-per-image {n} exceeds the {smallest} positions of the smallest "
                      f"grid; capped at {smallest} (use --sampling all for every position)",
                      stacklevel=3)
        log.warning("samples per image capped at %d (was %d)", smallest, n)
        return smallest
    return n


def sampling_groups(layers: list[str], shapes: dict, aligned: bool
                    ) -> list[tuple[str, list[str]]]:
    """(rng key, layers sharing positions): one per layer, or one per grid size if aligned."""
    if not aligned:
        return [(name, [name]) for name in layers]
    groups: dict[str, list[str]] = {}
    for name in layers:
        _, h, w = shapes[name]
        groups.setdefault(f"grid{h}x{w}", []).append(name)
    return list(groups.items())


def sample_batch(acts: dict[str, torch.Tensor], indices: list[int],
                 groups: list[tuple[str, list[str]]], shapes: dict, sampling: str,
                 n_samples: int, seed: int, torch_dtype: torch.dtype
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str | None]]:
    """Sampled vectors [B, n, C] (storage dtype) and provenance [B, n, 4] per layer.

    ``bad[i]`` names why image i must be skipped (non-finite activation, fp16 overflow).
    """
    B = len(indices)
    finite = torch.ones(B, dtype=torch.bool, device=next(iter(acts.values())).device)
    for a in acts.values():
        finite &= torch.isfinite(a).flatten(1).all(1)
    finite_np = finite.cpu().numpy()
    bad: list[str | None] = [None if f else NON_FINITE for f in finite_np]
    idx_col = np.asarray(indices, np.int64)
    vecs, provs = {}, {}
    for key, names in groups:
        _, h, w = shapes[names[0]]
        if sampling == "norm":
            sq = sum(torch.linalg.vector_norm(acts[k].float(), dim=1).double() ** 2
                     for k in names)
            norms = torch.sqrt(sq).flatten(1).cpu().numpy()
            norms[~finite_np] = 0.0
        else:
            norms = np.zeros((B, h * w))
        pos = np.stack([sample_positions(norms[i], sampling, n_samples,
                                         image_rng(seed, indices[i], key)) for i in range(B)])
        n = pos.shape[1]
        prov = np.empty((B, n, 4), np.int64)
        prov[:, :, 0] = idx_col[:, None]
        prov[:, :, 1], prov[:, :, 2] = pos // w, pos % w
        prov[:, :, 3] = np.arange(n)
        pos_t = torch.from_numpy(pos).to(finite.device)
        for k in names:
            a = acts[k]
            feats = a.permute(0, 2, 3, 1).reshape(B, h * w, a.shape[1])
            if sampling != "all":
                feats = feats[torch.arange(B, device=a.device)[:, None], pos_t]
            out = feats.to(torch_dtype).cpu().numpy()
            if torch_dtype == torch.float16:
                ok = np.isfinite(out.reshape(B, -1)).all(1)
                for i in np.flatnonzero(~ok):
                    bad[i] = bad[i] or FP16_OVERFLOW
            vecs[k], provs[k] = out, prov
    return vecs, provs, bad
