"""Cross-layer consistency: do co-activating latents of two layers sit in the same branch?

Latents of layers A and B are matched one-to-one (mutual best partners) by the correlation of
their activations on the same held-out (image, y, x) samples (rows aligned by store provenance;
needs equal grid sizes). Rare latents correlate by accident, so only latents firing on at least
``min_images`` distinct images take part. The matching itself has a null: the same procedure on
codes whose images are shifted (A on image i against B on another image), which calibrates the
correlation threshold. For matched pairs the dominant branches are compared: contingency table,
agreement rate against a null that shuffles the matching, Cohen's kappa.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from branchlens.analysis.branches import NONE
from branchlens.analysis.stats import agreement_permutation_test, cohen_kappa, contingency


def align_rows(prov_a: np.ndarray, prov_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (ia, ib) with equal (image_index, y, x); first occurrence of each key.

    Positions sampled with replacement repeat; one row per distinct sample position suffices.
    """
    pa, pb = np.asarray(prov_a)[:, :3], np.asarray(prov_b)[:, :3]
    if pa.size == 0 or pb.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    hi = np.maximum(pa.max(0), pb.max(0)) + 1

    def key(p: np.ndarray) -> np.ndarray:
        return (p[:, 0] * hi[1] + p[:, 1]) * hi[2] + p[:, 2]

    ka, ia = np.unique(key(pa), return_index=True)
    kb, ib = np.unique(key(pb), return_index=True)
    _, ja, jb = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    return ia[ja].astype(np.int64), ib[jb].astype(np.int64)


def _moments(z: sp.spmatrix, m: int) -> tuple[np.ndarray, np.ndarray]:
    s1 = np.asarray(z.sum(0)).ravel()
    s2 = np.asarray(z.multiply(z).sum(0)).ravel()
    mu = s1 / max(m, 1)
    return mu, np.sqrt(np.maximum(s2 / max(m, 1) - mu * mu, 0.0))


def mutual_best_matches(za: sp.csr_matrix, zb: sp.csr_matrix,
                        eligible_a: np.ndarray | None = None,
                        eligible_b: np.ndarray | None = None,
                        chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches: A latent a and B latent b where each is the other's best partner.

    ``za`` [M, nA] and ``zb`` [M, nB] are sparse codes on the same M aligned samples (zeros
    count), correlation is Pearson. Mutual best (rather than argmax per A latent) keeps
    near-duplicate latents of one layer from all matching one partner and counting as
    replicates. Returns (ia, ib, corr) sorted by decreasing correlation.
    """
    za, zb = sp.csc_matrix(za, dtype=np.float64), sp.csr_matrix(zb, dtype=np.float64)
    m = za.shape[0]
    na, nb = za.shape[1], zb.shape[1]
    ea = np.ones(na, bool) if eligible_a is None else np.asarray(eligible_a, bool)
    eb = np.ones(nb, bool) if eligible_b is None else np.asarray(eligible_b, bool)
    mu_a, sd_a = _moments(za, m)
    mu_b, sd_b = _moments(zb, m)
    ea, eb = ea & (sd_a > 0), eb & (sd_b > 0)
    best_b = np.full(na, -1, np.int64)
    corr_a = np.full(na, -np.inf)
    best_a = np.full(nb, -1, np.int64)
    corr_b = np.full(nb, -np.inf)
    zbt = zb.T.tocsr()
    cols_all = np.flatnonzero(ea)
    if cols_all.size and eb.any():
        for s in range(0, cols_all.size, chunk):
            cols = cols_all[s:s + chunk]
            cross = (zbt @ za[:, cols]).toarray().T  # [c, nB] = Σ_rows za·zb
            r = (cross / m - mu_a[cols, None] * mu_b[None, :]) / (
                sd_a[cols, None] * np.where(sd_b > 0, sd_b, 1.0)[None, :])
            r[:, ~eb] = -np.inf
            j = np.argmax(r, 1)
            best_b[cols], corr_a[cols] = j, r[np.arange(cols.size), j]
            i = np.argmax(r, 0)
            better = r[i, np.arange(nb)] > corr_b
            best_a[better], corr_b[better] = cols[i[better]], r[i[better], np.arange(nb)[better]]
    ia = np.flatnonzero((best_b >= 0) & np.isfinite(corr_a))
    ia = ia[best_a[best_b[ia]] == ia]
    ib, corr = best_b[ia], corr_a[ia]
    order = np.argsort(-corr, kind="stable")
    return ia[order], ib[order], corr[order]


def shifted_rows(prov_a: np.ndarray, prov_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                 groups: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Null alignment: A's samples of image i paired with B's samples of another image i',
    the image ``shift`` places further on in the list of image groups (mirror views stay with
    their image, so a view is never paired with its own mirror).

    Within an image, samples are paired in (y, x) order (the same position when every position
    was harvested). Keeps each layer's codes, firing rates and spatial structure; destroys only
    the co-firing on the same image. ``groups`` [n_images] is each image's group index.
    """
    pa, pb = np.asarray(prov_a)[ia, :3], np.asarray(prov_b)[ib, :3]
    imgs = np.unique(pa[:, 0])
    g = np.asarray(groups)[imgs]
    ug = np.unique(g)
    if ug.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    by_group = {k: imgs[g == k] for k in ug}
    rows_a = _rows_by_image(pa)
    rows_b = _rows_by_image(pb)
    out_a, out_b = [], []
    for gi, k in enumerate(ug):
        other = by_group[ug[(gi + shift) % ug.size]]
        for r, im in enumerate(by_group[k]):
            ra, rb = rows_a[int(im)], rows_b.get(int(other[r % other.size]))
            if rb is None or rb.size == 0:
                continue
            out_a.append(ia[ra])
            out_b.append(ib[rb[np.arange(ra.size) % rb.size]])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_a), np.concatenate(out_b)


def _rows_by_image(p: np.ndarray) -> dict[int, np.ndarray]:
    """Positions into ``p`` of each image's samples, in (y, x) order."""
    order = np.lexsort((p[:, 2], p[:, 1], p[:, 0]))
    imgs, starts = np.unique(p[order, 0], return_index=True)
    ends = np.append(starts[1:], order.size)
    return {int(i): order[s:e] for i, s, e in zip(imgs, starts, ends, strict=True)}


def consistency(dom_a: np.ndarray, dom_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                branches: list[str], *, n_perm: int = 10000, seed: int = 0) -> dict:
    """Dominant-branch agreement of matched pairs (ia[k], ib[k]) against a label-shuffle null.

    Main test on pairs where both latents have a dominant branch; a second table keeps
    "none" as a fifth label. The null shuffles which B latent goes with which A latent,
    keeping both layers' branch distributions and the dependence between latents.
    """
    la, lb = np.asarray(dom_a)[ia], np.asarray(dom_b)[ib]
    both = (la != NONE) & (lb != NONE)
    nb = len(branches)
    table = contingency(la[both], lb[both], nb)
    test = agreement_permutation_test(la[both], lb[both], n_perm=n_perm, seed=seed)
    la5 = np.where(la == NONE, nb, la)
    lb5 = np.where(lb == NONE, nb, lb)
    table5 = contingency(la5, lb5, nb + 1)
    test5 = agreement_permutation_test(la5, lb5, n_perm=n_perm, seed=seed)
    return {
        "matched_pairs": int(ia.size), "pairs_both_dominant": int(both.sum()),
        "labels": list(branches), "table": table.tolist(),
        "kappa": cohen_kappa(table), **{k: v for k, v in test.items() if k != "n_pairs"},
        "with_none": {"labels": [*branches, "none"], "table": table5.tolist(),
                      "kappa": cohen_kappa(table5),
                      **{k: v for k, v in test5.items() if k != "n_pairs"}},
        "per_branch_agreement": {
            b: (float(np.mean(lb[both][la[both] == i] == i)) if np.any(la[both] == i) else None)
            for i, b in enumerate(branches)},
    }
