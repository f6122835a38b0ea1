"""Cross-layer matching and consistency on planted co-activating latent pairs."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from branchlens.analysis.branches import NONE
from branchlens.analysis.crosslayer import (
    align_rows,
    consistency,
    mutual_best_matches,
    shifted_rows,
)

BR = ["1x1", "3x3", "5x5", "pool"]


def test_align_rows_by_provenance():
    rng = np.random.default_rng(0)
    grid = np.array([(i, y, x, 0) for i in range(5) for y in range(3) for x in range(3)])
    pa = grid[rng.permutation(len(grid))[:30]]
    pb = grid[rng.permutation(len(grid))[:35]]
    pb = np.concatenate([pb, pb[:5]])  # duplicated samples (sampling with replacement)
    pb[:, 3] = 7  # sample index differs, position is what counts
    ia, ib = align_rows(pa, pb)
    assert np.array_equal(pa[ia, :3], pb[ib, :3])
    common = {tuple(r) for r in pa[:, :3]} & {tuple(r) for r in pb[:, :3]}
    assert len(ia) == len(common) and len(set(ib.tolist())) == len(ib)


def planted_pairs(n_pairs=120, n_extra=80, n_rows=6000, n_img=300, seed=0):
    """Layer A latent i and layer B latent perm[i] fire together; extra latents independent."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, n_img, n_rows)
    na = nb = n_pairs + n_extra
    za = np.zeros((n_rows, na))
    zb = np.zeros((n_rows, nb))
    perm = rng.permutation(nb)
    for i in range(na):
        on = rng.random(n_rows) < 0.03
        za[on, i] = rng.exponential(1.0, on.sum())
        if i < n_pairs:
            zb[on, perm[i]] = za[on, i] * rng.uniform(0.7, 1.3, on.sum())
    for j in perm[n_pairs:]:
        on = rng.random(n_rows) < 0.03
        zb[on, j] = rng.exponential(1.0, on.sum())
    # Two rare latents firing together on 3 images only: high correlation by accident.
    rare_rows = np.flatnonzero(np.isin(img, [1, 2, 3]))[:6]
    za[:, -1] = 0
    zb[:, perm[-1]] = 0
    za[rare_rows, -1] = 1.0
    zb[rare_rows, perm[-1]] = 1.0
    return sp.csr_matrix(za), sp.csr_matrix(zb), perm, img


def distinct_images(z, img):
    z = z.tocoo()
    pairs = np.unique(np.stack([z.col, img[z.row]], 1), axis=0)
    return np.bincount(pairs[:, 0], minlength=z.shape[1])


def test_mutual_best_matches_recover_pairs_one_to_one_and_exclude_rare_latents():
    za, zb, perm, img = planted_pairs()
    ia, ib, corr = mutual_best_matches(za, zb, chunk=64)
    got = dict(zip(ia.tolist(), ib.tolist(), strict=True))
    assert sum(got.get(i) == perm[i] for i in range(120)) >= 118
    assert len(set(ib.tolist())) == ib.size  # one-to-one
    assert np.all(np.diff(corr) <= 0)  # sorted by correlation
    assert got.get(za.shape[1] - 1) == perm[-1]  # the rare pair matches — by accident
    ea = distinct_images(za, img) >= 20
    eb = distinct_images(zb, img) >= 20
    assert not ea[-1] and not eb[perm[-1]]
    ia2, ib2, _ = mutual_best_matches(za, zb, ea, eb, chunk=64)
    assert za.shape[1] - 1 not in ia2.tolist()


def test_near_duplicates_do_not_all_match_one_partner():
    za, zb, perm, _ = planted_pairs(n_pairs=50, n_extra=10)
    dup = sp.hstack([za, za[:, :5] * 1.01]).tocsr()  # five near-duplicate A latents
    ia, ib, _ = mutual_best_matches(dup, zb)
    assert len(set(ib.tolist())) == ib.size
    assert sum(int(b) in {int(perm[i]) for i in range(5)} for b in ib) <= 5


def test_shifted_rows_pair_different_images_at_the_same_position():
    grid = np.array([(i, y, x, 0) for i in range(6) for y in range(2) for x in range(2)])
    groups = np.array([0, 0, 1, 1, 2, 2])  # images 2k and 2k+1 are views of one image
    rows = np.arange(len(grid))
    sa, sb = shifted_rows(grid, grid, rows, rows, groups, 1)
    assert sa.size == len(grid)
    assert np.all(grid[sa, 1:3] == grid[sb, 1:3])
    assert np.all(groups[grid[sa, 0]] != groups[grid[sb, 0]])


def test_shifted_image_null_breaks_the_matching():
    za, zb, perm, img = planted_pairs()
    order = np.argsort(img, kind="stable")
    za, zb, img = za[order], zb[order], img[order]
    # Shift B's rows to rows of other images: co-firing gone, firing rates kept.
    shift = np.roll(np.arange(za.shape[0]), 997)
    _, _, corr = mutual_best_matches(za, zb[shift])
    assert np.quantile(corr, 0.99) < 0.3


def test_consistency_significant_for_shared_branches_not_for_shuffled():
    za, zb, perm, img = planted_pairs(seed=1)
    ia, ib, corr = mutual_best_matches(za, zb)
    keep = corr >= 0.5
    ia, ib = ia[keep], ib[keep]
    rng = np.random.default_rng(2)
    dom_a = rng.choice([0, 1, 2, 3, NONE], size=za.shape[1], p=[.3, .3, .2, .1, .1])
    dom_b = np.full(zb.shape[1], NONE)
    dom_b[perm] = dom_a  # matched partners share their dominant branch ...
    flip = rng.random(zb.shape[1]) < 0.3  # ... up to 30 % noise
    dom_b[flip] = rng.choice([0, 1, 2, 3, NONE], size=flip.sum())
    res = consistency(dom_a, dom_b, ia, ib, BR, n_perm=2000)
    assert res["matched_pairs"] >= 115
    assert res["p_value"] < 0.001 and res["kappa"] > 0.4
    assert res["agreement"] > res["null_q95"]
    assert np.trace(np.array(res["table"])) == round(res["agreement"] * res["pairs_both_dominant"])
    null = consistency(dom_a, rng.permutation(dom_b), ia, ib, BR, n_perm=2000)
    assert null["p_value"] > 0.01 and abs(null["kappa"]) < 0.15
