"""Planted decoders with known answers, for tests and for checking the statistics by hand.

Two regimes: isotropic Gaussian directions (where the textbook Beta null is right) and
heavy-tailed, sparse, channel-scaled values like real SAE decoders (where it is badly wrong
and only the channel-permutation null is calibrated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from branchlens.analysis.branches import NONE


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
