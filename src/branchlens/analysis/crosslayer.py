"""Cross-layer consistency: do co-activating latents of two layers sit in the same branch?

Latents of layers A and B are matched by the correlation of their activations on the same
(image, y, x) samples (rows aligned by store provenance; needs equal grid sizes). Rare latents
correlate by accident, so only latents firing on at least ``min_images`` distinct images take
part. For matched pairs above a threshold, the dominant branches are compared: contingency
table, agreement rate against a null that shuffles the matching, and Cohen's kappa.
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


def best_matches(za: sp.csr_matrix, zb: sp.csr_matrix, eligible_a: np.ndarray | None = None,
                 eligible_b: np.ndarray | None = None,
                 chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each latent of A, the B latent with the highest Pearson correlation of activations.

    ``za`` [M, nA] and ``zb`` [M, nB] are sparse codes on the same M aligned samples (zeros
    count). Returns (best_b [nA] with −1 for ineligible/constant latents, corr [nA], NaN there).
    """
    za, zb = sp.csc_matrix(za, dtype=np.float64), sp.csr_matrix(zb, dtype=np.float64)
    m = za.shape[0]
    na, nb = za.shape[1], zb.shape[1]
    ea = np.ones(na, bool) if eligible_a is None else np.asarray(eligible_a, bool)
    eb = np.ones(nb, bool) if eligible_b is None else np.asarray(eligible_b, bool)

    def moments(z):
        s1 = np.asarray(z.sum(0)).ravel()
        s2 = np.asarray(z.multiply(z).sum(0)).ravel()
        mu = s1 / max(m, 1)
        sd = np.sqrt(np.maximum(s2 / max(m, 1) - mu * mu, 0.0))
        return mu, sd

    mu_a, sd_a = moments(za)
    mu_b, sd_b = moments(zb)
    eb = eb & (sd_b > 0)
    best = np.full(na, -1, np.int64)
    corr = np.full(na, np.nan)
    zbt = zb.T.tocsr()
    for s in range(0, na, chunk):
        cols = np.arange(s, min(na, s + chunk))
        cols = cols[ea[cols] & (sd_a[cols] > 0)]
        if cols.size == 0 or not eb.any():
            continue
        cross = (zbt @ za[:, cols]).toarray().T  # [c, nB] = Σ_rows za·zb
        cov = cross / m - mu_a[cols, None] * mu_b[None, :]
        r = cov / (sd_a[cols, None] * np.where(sd_b > 0, sd_b, 1.0)[None, :])
        r[:, ~eb] = -np.inf
        j = np.argmax(r, 1)
        best[cols] = j
        corr[cols] = r[np.arange(cols.size), j]
    return best, corr


def consistency(dom_a: np.ndarray, dom_b: np.ndarray, best_b: np.ndarray, corr: np.ndarray,
                branches: list[str], *, threshold: float = 0.5, n_perm: int = 10000,
                seed: int = 0) -> dict:
    """Dominant-branch agreement of matched pairs (corr ≥ threshold), with its null.

    Main test on pairs where both latents have a dominant branch; a second table keeps
    "none" as a fifth label. The null shuffles which B latent goes with which A latent,
    keeping both layers' branch distributions and the dependence between latents.
    """
    ok = (best_b >= 0) & (np.nan_to_num(corr, nan=-np.inf) >= threshold)
    ia = np.flatnonzero(ok)
    la, lb = dom_a[ia], dom_b[best_b[ia]]
    both = (la != NONE) & (lb != NONE)
    nb = len(branches)
    table = contingency(la[both], lb[both], nb)
    test = agreement_permutation_test(la[both], lb[both], n_perm=n_perm, seed=seed)
    la5 = np.where(la == NONE, nb, la)
    lb5 = np.where(lb == NONE, nb, lb)
    table5 = contingency(la5, lb5, nb + 1)
    test5 = agreement_permutation_test(la5, lb5, n_perm=n_perm, seed=seed)
    return {
        "threshold": threshold, "matched_pairs": int(ia.size),
        "pairs_both_dominant": int(both.sum()),
        "labels": list(branches), "table": table.tolist(),
        "kappa": cohen_kappa(table), **{k: v for k, v in test.items() if k != "n_pairs"},
        "with_none": {"labels": [*branches, "none"], "table": table5.tolist(),
                      "kappa": cohen_kappa(table5),
                      **{k: v for k, v in test5.items() if k != "n_pairs"}},
        "per_branch_agreement": {
            b: (float(np.mean(lb[both][la[both] == i] == i)) if np.any(la[both] == i) else None)
            for i, b in enumerate(branches)},
        "note": "pairs share images; the shuffle null keeps that dependence, BH-style "
                "independence is not assumed",
    }
