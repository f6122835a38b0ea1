"""Decoder geometry: do latents of the same dominant branch point in similar directions?

Embeds **latents** (rows of the decoder, [n_latents, d], unit-normalised, cosine metric) — the
paper's UMAP was fitted on the transposed matrix and embedded channels by mistake.
"""

from __future__ import annotations

import numpy as np
import torch

from branchlens.analysis.branches import NONE


def unit_rows(decoder) -> np.ndarray:
    v = decoder.detach().cpu().numpy() if isinstance(decoder, torch.Tensor) else decoder
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def knn_indices(decoder, k: int = 10, chunk: int = 2048, device: str = "cpu") -> np.ndarray:
    """[n, k] indices of each row's k most cosine-similar other rows."""
    u = torch.from_numpy(unit_rows(decoder)).to(device)
    n = u.shape[0]
    k = min(k, n - 1)
    out = np.empty((n, k), np.int64)
    for s in range(0, n, chunk):
        sim = u[s:s + chunk] @ u.T
        idx = torch.arange(s, min(n, s + chunk), device=device)
        sim[torch.arange(idx.numel(), device=device), idx] = -np.inf
        out[s:s + chunk] = sim.topk(k, dim=1).indices.cpu().numpy()
    return out


def knn_branch_agreement(decoder, labels: np.ndarray, k: int = 10, n_perm: int = 1000,
                         seed: int = 0, device: str = "cpu") -> dict:
    """Fraction of each labelled latent's k cosine neighbours (among labelled latents) that
    share its dominant branch, against label shuffles on the fixed neighbour graph.

    One number per layer; ``chance`` is the shuffle mean (≈ Σ_b p_b²).
    """
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels != NONE)
    out = {"k": k, "n_labelled": int(keep.size)}
    if keep.size < 3:
        return {**out, "agreement": None, "chance": None, "ratio": None, "p_value": None}
    lab = labels[keep]
    nn = knn_indices(unit_rows(decoder)[keep], k, device=device)
    obs = float(np.mean(lab[nn] == lab[:, None]))
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        p = rng.permutation(lab)
        null[i] = np.mean(p[nn] == p[:, None])
    chance = float(null.mean())
    return {**out, "agreement": obs, "chance": chance,
            "ratio": obs / chance if chance > 0 else None,
            "p_value": float((1 + np.sum(null >= obs)) / (1 + n_perm))}


def embed_latents(decoder, method: str = "auto", seed: int = 0,
                  n_neighbors: int = 15) -> tuple[np.ndarray, str, str]:
    """2-D embedding of the latents: (coords [n_latents, 2], method used, note).

    ``auto`` uses UMAP (cosine metric) when umap-learn imports, else PCA of the unit rows.
    """
    u = unit_rows(decoder)
    note = ""
    if method in ("auto", "umap"):
        try:
            import umap  # noqa: F401  (heavy import; numba compiles on first use)
        except Exception as e:  # pragma: no cover - depends on the environment
            if method == "umap":
                raise
            note = f"umap-learn unavailable ({type(e).__name__}); PCA fallback"
        else:

            # 200 epochs (UMAP's own choice above 10k points) keeps 8–13k latents to ~30 s.
            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_jobs=1,
                                n_epochs=200,
                                n_neighbors=min(n_neighbors, max(2, u.shape[0] - 1)),
                                init="random" if u.shape[0] < 10 else "spectral")
            return np.asarray(reducer.fit_transform(u), dtype=np.float32), "umap", note
    c = u - u.mean(0, keepdims=True)
    # the top two eigenvectors of the d×d scatter matrix: the SVD of the n×d rows gives the
    # same axes at ~50× the cost (8192×512: 5 s); each axis' sign fixed by its largest loading
    _, vecs = np.linalg.eigh(c.T @ c)
    axes = vecs[:, ::-1][:, :2]
    axes = axes * np.sign(axes[np.abs(axes).argmax(0), [0, 1]])[None, :]
    return (c @ axes).astype(np.float32), "pca", note or "PCA of unit decoder rows"
