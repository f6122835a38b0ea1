"""Data with known answers for tests and benchmarks (not shipped in the package).

- :func:`planted_decoder`: decoders whose specialised latents and branches are known, in two
  regimes: isotropic Gaussian directions (where the textbook Beta null is right) and
  heavy-tailed, sparse, channel-scaled values like real SAE decoders (where only the
  channel-permutation null is calibrated).
- :func:`planted_dictionary` / :func:`recovered_fraction`: vectors built from known atoms, to
  check that training recovers a dictionary.
- :func:`write_synthetic`: a complete activation store without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from branchlens.analysis.branches import NONE
from branchlens.store import (
    ActivationStore,
    ShardWriter,
    StoreLock,
    finalize_store,
    prepare_store,
)


@dataclass
class Planted:
    decoder: np.ndarray  # [n, d]
    truth: np.ndarray  # [n] planted branch index, or NONE for null latents
    channel_scale: np.ndarray  # [d] multiplicative scale applied to every latent


def _values(rng: np.random.Generator, n: int, d: int, heavy: bool) -> np.ndarray:
    if not heavy:
        return rng.standard_normal((n, d))
    # Student-t with 3 d.o.f. (kurtosis ∞ in theory, large in practice) and 60 % near-zero.
    v = rng.standard_t(3, size=(n, d))
    keep = rng.random((n, d)) < 0.4
    return np.where(keep, v, 0.05 * rng.standard_normal((n, d)))


def planted_decoder(slices: dict[str, slice], n_null: int, n_planted: int, *,
                    heavy: bool = False, boost: float = 4.0, channel_sigma: float = 0.0,
                    branch_gain: dict[str, float] | None = None,
                    planted_branches: list[str] | None = None, seed: int = 0) -> Planted:
    """Null latents plus latents whose planted branch's values are multiplied by ``boost``.

    ``channel_sigma`` > 0 gives every channel a fixed log-normal scale (shared by all latents,
    non-isotropic); ``branch_gain`` makes whole branches louder (the scale-control confound).
    Planted latents cycle over the branches (or over ``planted_branches``, names that may repeat,
    to plant unbalanced). Rows are unit-normalised.
    """
    rng = np.random.default_rng(seed)
    names = list(slices)
    d = sum(s.stop - s.start for s in slices.values())
    n = n_null + n_planted
    v = _values(rng, n, d, heavy)
    truth = np.full(n, NONE, dtype=np.int64)
    cycle = [names.index(b) for b in planted_branches] if planted_branches else list(
        range(len(names)))
    for k in range(n_planted):
        b = cycle[k % len(cycle)]
        i = n_null + k
        v[i, slices[names[b]]] *= boost
        truth[i] = b
    scale = np.exp(channel_sigma * rng.standard_normal(d)) if channel_sigma > 0 else np.ones(d)
    for b, g in (branch_gain or {}).items():
        scale[slices[b]] *= g
    v = v * scale[None, :]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return Planted(decoder=v[perm], truth=truth[perm], channel_scale=scale)


def planted_dictionary(n_atoms: int, n_samples: int, k: int = 32, variant: str = "bvlc_googlenet",
                       layer: str = "mixed4c", noise: float = 0.01, seed: int = 0
                       ) -> tuple[Tensor, Tensor]:
    """Synthetic data with a known answer: (atoms [n_atoms, d] unit-norm, each supported on one
    branch slice of ``layer``; samples [n_samples, d] = k random atoms with positive weights
    plus Gaussian noise). Used to check that training recovers a dictionary."""
    from branchlens.variants import branch_slices

    gen = torch.Generator().manual_seed(seed)
    slices = list(branch_slices(variant, layer).values())
    d = slices[-1].stop
    widths = torch.tensor([s.stop - s.start for s in slices], dtype=torch.float64)
    branch = torch.multinomial(widths / widths.sum(), n_atoms, replacement=True, generator=gen)
    atoms = torch.zeros(n_atoms, d)
    for b, s in enumerate(slices):
        rows = (branch == b).nonzero().squeeze(1)
        atoms[rows, s] = torch.randn(len(rows), s.stop - s.start, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.randint(n_atoms, (n_samples, k), generator=gen)  # rare repeats are harmless
    coef = 0.5 + torch.rand(n_samples, k, generator=gen)
    x = F.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
    return atoms, x + noise * torch.randn(n_samples, d, generator=gen)


def recovered_fraction(atoms: Tensor, directions: Tensor, threshold: float = 0.9) -> float:
    """Share of true atoms whose best-matching decoder direction has cosine ≥ threshold."""
    a = F.normalize(atoms.float(), dim=1)
    w = F.normalize(directions.float(), dim=1)
    return float(((a @ w.t()).max(dim=1).values >= threshold).float().mean())


def write_synthetic(path: str | Path, layer: str = "mixed4c", n_images: int = 12,
                    per_image: int = 20, d: int = 64, images_per_shard: int = 4,
                    seed: int = 0) -> ActivationStore:
    """A complete store of gamma-distributed vectors (non-negative, like post-ReLU activations)
    for tests and benchmarks that need real store I/O without running the model."""
    cfg = {"variant": "bvlc_googlenet", "layers": [layer],
           "widths": {layer: {"channels": d, "grid": [14, 14], "branches": None}},
           "sampling": {"method": "all", "samples_per_image": per_image, "aligned": False,
                        "seed": seed},
           "dtype": "fp32", "source": {"description": "synthetic", "n_images": n_images},
           "weights": {"source": "none"}}
    rng = np.random.default_rng(seed)
    lock = StoreLock(path).acquire()
    try:
        prepare_store(path, cfg)
        w = ShardWriter(path, 0, [layer], {layer: d}, "fp32", images_per_shard, seq=0)
        for i in range(n_images):
            vec = rng.gamma(2.0, 1.0, (per_image, d)).astype(np.float32)
            prov = np.array([[i, s // 14, s % 14, s] for s in range(per_image)])
            w.add(i, f"img{i}", None, {layer: vec}, {layer: prov})
        w.flush()
        finalize_store(path, n_images, {})
    finally:
        lock.release()
    return ActivationStore.open(path)
