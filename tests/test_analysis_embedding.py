"""Decoder geometry: kNN branch agreement and the latent (not channel) embedding."""

from __future__ import annotations

import numpy as np

from branchlens.analysis.branches import NONE
from branchlens.analysis.embedding import embed_latents, knn_branch_agreement


def clustered(n_per=60, d=64, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, d))
    lab = np.repeat(np.arange(4), n_per)
    v = centres[lab] + spread * rng.standard_normal((lab.size, d)) * np.sqrt(1)
    return v, lab


def test_knn_agreement_high_for_clustered_chance_for_random():
    v, lab = clustered()
    lab_none = lab.copy()
    lab_none[::10] = NONE  # unlabelled latents are left out
    res = knn_branch_agreement(v, lab_none, k=5, n_perm=200)
    assert res["n_labelled"] == int(np.sum(lab_none != NONE))
    assert res["agreement"] > 0.9 and res["p_value"] < 0.01 and res["ratio"] > 3
    rnd = knn_branch_agreement(np.random.default_rng(1).standard_normal(v.shape), lab, k=5,
                               n_perm=200)
    assert abs(rnd["agreement"] - rnd["chance"]) < 0.05 and rnd["p_value"] > 0.01
    assert abs(rnd["chance"] - 0.25) < 0.02


def test_embedding_has_one_point_per_latent_not_per_channel():
    v, lab = clustered(n_per=30, d=48)  # 120 latents × 48 channels
    for method in ("pca", "umap"):
        coords, used, _ = embed_latents(v, method, seed=0)
        assert used == method
        assert coords.shape == (v.shape[0], 2)  # latents, never channels (48)
        # Same-branch latents end up close: nearest neighbour in 2-D shares the label.
        dist = ((coords[:, None] - coords[None]) ** 2).sum(-1)
        np.fill_diagonal(dist, np.inf)
        assert np.mean(lab[dist.argmin(1)] == lab) > 0.9
