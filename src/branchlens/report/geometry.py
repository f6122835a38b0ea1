"""Decoder geometry the latent pages show: neighbours in decoder space and each latent's own
channel-permutation null band of the branch ratio.

Both come from ``RUN/sae/<layer>/weights.safetensors`` read with numpy (no torch), in chunks so
memory stays O(chunk · n_latents). The null band is per latent because the channel-permutation
null of the paper ratio depends on how that latent spreads its energy over channels; it is the
same null the analysis tests against (``p_raw``), drawn here only to show its 5–95 % range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_NEIGHBOURS = 8
N_NULL = 100  # permutations per latent for the band (only a picture; the test is the analysis')


def load_decoder(sae_dir: Path) -> np.ndarray | None:
    """Decoder rows [n_latents, d_in] (``W_dec``, or ``W_enc`` when tied), float32; None if
    the weights are missing or unreadable."""
    path = sae_dir / "weights.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors.numpy import load_file

        t = load_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file means "no geometry", not a crash
        return None
    w = t.get("W_dec", t.get("W_enc"))
    if w is None or w.ndim != 2:
        return None
    return np.asarray(w, dtype=np.float32)


def neighbours(dec: np.ndarray, k: int = N_NEIGHBOURS, chunk: int = 1024,
               include: np.ndarray | None = None) -> np.ndarray:
    """[n, k] most cosine-similar other decoder rows (among ``include``; -1 pads)."""
    n = dec.shape[0]
    u = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
    cand = np.arange(n) if include is None else np.flatnonzero(include)
    k = min(k, max(cand.size - 1, 0))
    out = np.full((n, max(k, 0)), -1, np.int64)
    if k == 0:
        return out
    uc = u[cand]
    for s in range(0, n, chunk):
        sim = u[s:s + chunk] @ uc.T
        rows = np.arange(s, min(n, s + chunk))
        pos = np.searchsorted(cand, rows)
        hit = (pos < cand.size) & (cand[np.minimum(pos, cand.size - 1)] == rows)
        sim[np.flatnonzero(hit), pos[hit]] = -np.inf  # never one's own neighbour
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sim, part, 1).argsort(1)[:, ::-1]
        out[s:s + chunk] = cand[np.take_along_axis(part, order, 1)]
    return out


def paper_ratios(dec: np.ndarray, slices: dict[str, list[int]]) -> np.ndarray:
    """‖relu(v_b)‖/‖relu(v)‖ per branch, [n, B] (NaN for rows without positive part)."""
    e = np.maximum(dec, 0.0, dtype=np.float64) ** 2
    tot = e.sum(1, keepdims=True)
    per = np.stack([e[:, a:b].sum(1) for a, b in slices.values()], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(np.where(tot > 0, per / tot, np.nan))


def null_band(dec: np.ndarray, slices: dict[str, list[int]], n_perm: int = N_NULL,
              seed: int = 0, chunk: int = 2048) -> np.ndarray:
    """[n, B, 2]: 5 % and 95 % of each latent's paper ratio under random channel permutations
    (the same permutations for every latent: enough for a picture, cheap as one matmul)."""
    n, d = dec.shape
    labels = np.full(d, -1)
    for i, (a, b) in enumerate(slices.values()):
        labels[a:b] = i
    nb = len(slices)
    rng = np.random.default_rng(seed)
    ind = np.zeros((d, n_perm * nb), np.float32)  # column p*nb+i: channels of branch i in perm p
    for p in range(n_perm):
        lab = labels[rng.permutation(d)]
        ok = lab >= 0
        ind[np.flatnonzero(ok), p * nb + lab[ok]] = 1.0
    out = np.full((n, nb, 2), np.nan, np.float32)
    for s in range(0, n, chunk):
        e = np.maximum(dec[s:s + chunk], 0.0) ** 2
        tot = e.sum(1, keepdims=True)
        share = (e / np.where(tot > 0, tot, 1.0)) @ ind  # [c, P*B]
        r = np.sqrt(np.clip(share, 0, 1)).reshape(-1, n_perm, nb)
        q = np.quantile(r, [0.05, 0.95], axis=1)  # [2, c, B]
        band = np.moveaxis(q, 0, -1)
        band[tot[:, 0] <= 0] = np.nan
        out[s:s + chunk] = band
    return out
