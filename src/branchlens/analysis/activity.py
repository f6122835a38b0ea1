"""Data side of each latent: firing, top-activating vectors/images and branch attribution.

One sequential pass over a layer's stored vectors (rows are known, so top rows map back to
provenance (image, y, x)); memory stays bounded by the batch size and [n_latents, top].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
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


def latent_activity(encode: Callable[[torch.Tensor], torch.Tensor], array: np.ndarray,
                    image_index: np.ndarray, n_latents: int, *, top: int = 64,
                    batch_size: int = 4096, n_images: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    device: str = "cpu") -> Activity:
    """Run ``encode`` (dense z [B, n]) over ``array`` [N, d] in row order.

    ``image_index`` [N] gives each row's image, for the distinct-firing-image counts that the
    cross-layer matching needs (a latent firing on few images correlates by accident).
    """
    n_rows = int(array.shape[0])
    n_img = int(n_images if n_images is not None else (image_index.max() + 1 if n_rows else 0))
    fired = np.zeros((n_img, n_latents), dtype=bool)
    fire_count = torch.zeros(n_latents, dtype=torch.int64, device=device)
    act_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
    top_val = torch.zeros(n_latents, top, device=device)
    top_row = torch.full((n_latents, top), -1, dtype=torch.int64, device=device)
    with torch.no_grad():
        for s in range(0, n_rows, batch_size):
            e = min(n_rows, s + batch_size)
            x = torch.from_numpy(np.ascontiguousarray(array[s:e], dtype=np.float32))
            z = encode(x.to(device)).float()
            active = z > 0
            fire_count += active.sum(0)
            act_sum += z.sum(0, dtype=torch.float64)
            r, c = active.nonzero(as_tuple=True)
            fired[image_index[s + r.cpu().numpy()], c.cpu().numpy()] = True
            cand_v = torch.cat([top_val, z.T], 1)
            rows = torch.arange(s, e, device=device).expand(n_latents, -1)
            cand_r = torch.cat([top_row, rows], 1)
            v, i = cand_v.topk(top, dim=1)
            top_val, top_row = v, cand_r.gather(1, i)
            if progress is not None:
                progress(e - s)
    top_row = torch.where(top_val > 0, top_row, torch.full_like(top_row, -1))
    return Activity(n_vectors=n_rows, fire_count=fire_count.cpu().numpy(),
                    act_sum=act_sum.cpu().numpy(), top_val=top_val.cpu().numpy(),
                    top_row=top_row.cpu().numpy(), n_images_fired=fired.sum(0))


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
