"""Data side of each latent: firing, top-activating vectors/images and branch attribution.

One sequential pass over a layer's stored vectors (rows are known, so top rows map back to
provenance (image, y, x)); memory stays bounded by the batch size and [n_latents, top].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


@dataclass
class Activity:
    """Per-latent activity over the stored vectors of one layer."""

    n_vectors: int
    fire_count: np.ndarray  # [n] vectors with z > 0
    act_sum: np.ndarray  # [n] Σ z
    top_val: np.ndarray  # [n, T] largest activations, descending (0 = fewer than T firings)
    top_row: np.ndarray  # [n, T] their store rows (−1 where top_val is 0)
    n_images_fired: np.ndarray  # [n] distinct images with at least one firing
    codes: sp.csr_matrix | None = None  # [N, n] every row's code (``keep_codes``)

    @property
    def firing_rate(self) -> np.ndarray:
        return self.fire_count / max(self.n_vectors, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean of z over all vectors (zeros included)."""
        return self.act_sum / max(self.n_vectors, 1)

    @property
    def mean_when_active(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fire_count > 0, self.act_sum / self.fire_count, 0.0)


def latent_activity(encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
                    array: np.ndarray, image_index: np.ndarray, n_latents: int, *,
                    top: int = 64, batch_size: int = 4096, n_images: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    device: str = "cpu", keep_codes: bool = False) -> Activity:
    """Run ``encode`` over ``array`` [N, d] in row order.

    ``encode`` gives a dense code z [B, n] or a sparse one (values [B, k], indices [B, k], as
    ``TopKSAE.encode_sparse``); the sparse one is cheaper: only the B·k firings are counted and
    ranked (a running top ``top`` per latent kept as (latent, value, row) triples) instead of
    n·(top + B) dense candidates per batch.
    ``keep_codes``: also return every row's code (sparse, [N, n]) for later passes (the
    cross-layer matching) so they need not encode the rows again.
    ``image_index`` [N] gives each row's image, for the distinct-firing-image counts that the
    cross-layer matching needs (a latent firing on few images correlates by accident).
    """
    n_rows = int(array.shape[0])
    n_img = int(n_images if n_images is not None else (image_index.max() + 1 if n_rows else 0))
    fired = np.zeros((n_img, n_latents), dtype=bool)
    fire_count = np.zeros(n_latents, np.int64)
    act_sum = np.zeros(n_latents, np.float64)
    best = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    floor = np.zeros(n_latents, np.float32)  # top-th largest value so far (0: not full yet)
    with torch.no_grad():
        for s in range(0, n_rows, batch_size):
            e = min(n_rows, s + batch_size)
            x = torch.from_numpy(np.ascontiguousarray(array[s:e], dtype=np.float32))
            lat, val, row = _firings(encode(x.to(device)), s)
            fire_count += np.bincount(lat, minlength=n_latents)
            act_sum += np.bincount(lat, weights=val, minlength=n_latents)
            fired[image_index[row], lat] = True
            if keep_codes:
                kept.append((lat, val, row))
            # a firing at or below a full latent's current top-th value can never enter it
            # (ties go to the earlier row), so most of each batch is dropped before the sort
            new = val > floor[lat]
            best = _keep_top(*(np.concatenate(p) for p in zip(
                best, (lat[new], val[new], row[new]), strict=True)), top)
            full = np.bincount(best[0], minlength=n_latents) == top
            floor[:] = 0.0
            last = np.searchsorted(best[0], np.flatnonzero(full), side="right") - 1
            floor[full] = best[1][last]
            if progress is not None:
                progress(e - s)
    lat, val, row = best
    top_val = np.zeros((n_latents, top), np.float32)
    top_row = np.full((n_latents, top), -1, np.int64)
    rank = np.arange(lat.size) - np.searchsorted(lat, lat)  # lat is sorted by _keep_top
    top_val[lat, rank], top_row[lat, rank] = val, row
    codes = None
    if keep_codes:
        c_lat, c_val, c_row = (np.concatenate(p) for p in zip(
            *kept, strict=True)) if kept else (np.zeros(0, np.int64),) * 3
        codes = sp.csr_matrix((c_val, (c_row, c_lat)), shape=(n_rows, n_latents))
    return Activity(n_vectors=n_rows, fire_count=fire_count, act_sum=act_sum, top_val=top_val,
                    top_row=top_row, n_images_fired=fired.sum(0), codes=codes)


def _firings(code, first_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latent, value, store row) of every z > 0 of a dense or (values, indices) code."""
    if isinstance(code, tuple):
        vals = code[0].detach().float().cpu().numpy()
        idx = code[1].detach().cpu().numpy()
        r, c = np.nonzero(vals > 0)
        return idx[r, c].astype(np.int64), vals[r, c], first_row + r.astype(np.int64)
    z = code.detach().float().cpu().numpy()
    r, c = np.nonzero(z > 0)
    return c.astype(np.int64), z[r, c], first_row + r.astype(np.int64)


def _keep_top(lat: np.ndarray, val: np.ndarray, row: np.ndarray, top: int):
    """The ``top`` largest values of each latent (ties: earlier row first), sorted by latent,
    then by value descending."""
    order = np.lexsort((row, -val, lat))
    lat, val, row = lat[order], val[order], row[order]
    keep = np.arange(lat.size) - np.searchsorted(lat, lat) < top
    return lat[keep], val[keep], row[keep]


def top_images(top_row: np.ndarray, image_index: np.ndarray, max_images: int = 16,
               groups: np.ndarray | None = None) -> list[list]:
    """Distinct images of each latent's top rows, in order of activation, at most max_images.

    With ``groups`` [n_images] an image group (an image and its mirror) counts once.
    """
    out = []
    for rows in top_row:
        seen: list[int] = []
        seen_g: set[int] = set()
        for r in rows:
            if r < 0:
                break
            im = int(image_index[r])
            g = im if groups is None else int(groups[im])
            if g not in seen_g:
                seen_g.add(g)
                seen.append(im)
                if len(seen) == max_images:
                    break
        out.append(seen)
    return out


def branch_attribution(centered: Callable[[torch.Tensor], torch.Tensor], w_enc: torch.Tensor,
                       array: np.ndarray, top_row: np.ndarray, slices: dict[str, slice], *,
                       n_top: int = 16, latent_chunk: int = 256) -> np.ndarray:
    """Share of each latent's encoder pre-activation contributed by each branch's channels.

    For latent i and each of its top ``n_top`` rows x: ``c_j = centered(x)_j · W_enc[i, j]``
    (``centered(x)`` is the SAE's ``s·x − b_pre``); share_b = Σ_rows Σ_{j∈b} c_j / Σ_rows Σ_j c_j
    (a ratio of sums, stable when single rows are near zero). NaN for latents that never fired.
    Shares can be negative (a branch inhibiting) or above 1.
    """
    n, nb = top_row.shape[0], len(slices)
    out = np.full((n, nb), np.nan)
    rows_all = top_row[:, :n_top]
    onehot = torch.zeros(w_enc.shape[1], nb, device=w_enc.device)
    for b, s in enumerate(slices.values()):
        onehot[s, b] = 1.0
    with torch.no_grad():
        for s in range(0, n, latent_chunk):
            rows = rows_all[s:s + latent_chunk]
            uniq, inv = np.unique(np.where(rows >= 0, rows, rows.max(initial=0)),
                                  return_inverse=True)
            if rows.max(initial=-1) < 0:
                continue
            xc = centered(torch.from_numpy(np.ascontiguousarray(array[uniq], np.float32))
                          .to(w_enc.device))
            x = xc[torch.from_numpy(inv.reshape(rows.shape)).to(w_enc.device)]  # [c, T, d]
            contrib = x * w_enc[s:s + rows.shape[0], None, :]  # [c, T, d]
            mask = torch.from_numpy(rows >= 0)[:, :, None].float().to(w_enc.device)
            per_b = ((contrib * mask) @ onehot).sum(1).double()  # [c, nb]
            tot = per_b.sum(1, keepdim=True)
            share = torch.where(tot != 0, per_b / tot, torch.full_like(per_b, float("nan")))
            share[~torch.from_numpy(rows[:, 0] >= 0).to(share.device)] = float("nan")
            out[s:s + rows.shape[0]] = share.cpu().numpy()
    return out
