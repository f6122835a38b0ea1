"""BH, Cohen's kappa, the shuffle-the-matching test and Mann–Whitney on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from branchlens.analysis.stats import (
    agreement_permutation_test,
    bh_reject,
    cohen_kappa,
    contingency,
    mann_whitney,
)


def test_bh_matches_scipy_and_handles_nan():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=900), rng.uniform(0, 1e-4, size=100)])
    rej, adj = bh_reject(p, 0.05)
    np.testing.assert_allclose(adj, sps.false_discovery_control(p), rtol=1e-12)
    assert rej.sum() == np.sum(sps.false_discovery_control(p) <= 0.05) >= 100
    p2 = np.stack([p, p[::-1]], 1)
    p2[0, 0] = np.nan
    rej2, adj2 = bh_reject(p2, 0.05)
    assert not rej2[0, 0] and np.isnan(adj2[0, 0])
    np.testing.assert_allclose(adj2[:, 1], sps.false_discovery_control(p[::-1]))


def test_cohen_kappa_known_values():
    assert cohen_kappa(np.diag([10, 20, 30])) == pytest.approx(1.0)
    # Classic example: po = 0.7, pe = 0.5 → kappa 0.4.
    assert cohen_kappa(np.array([[20, 5], [10, 15]])) == pytest.approx(0.4)
    # Independent raters: kappa 0.
    assert cohen_kappa(np.outer([1, 2, 3], [3, 1, 1])) == pytest.approx(0.0)
    t = contingency(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert t.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_agreement_test_significant_only_with_real_pairing():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, 300)
    b = np.where(rng.random(300) < 0.5, a, rng.integers(0, 4, 300))  # half copied
    res = agreement_permutation_test(a, b, n_perm=2000)
    assert res["p_value"] < 0.001 and res["agreement"] > res["null_q95"]
    shuffled = agreement_permutation_test(a, rng.permutation(b), n_perm=2000)
    assert shuffled["p_value"] > 0.01
    assert abs(shuffled["null_mean"] - res["null_mean"]) < 0.01


def test_mann_whitney_effect_direction():
    rng = np.random.default_rng(2)
    x, y = rng.normal(1, 1, 80), rng.normal(0, 1, 200)
    r = mann_whitney(x, y)
    assert r["p_value"] < 1e-6 and 0.3 < r["effect"] < 0.8
    same = mann_whitney(rng.normal(0, 1, 80), rng.normal(0, 1, 200))
    assert same["p_value"] > 0.001 and abs(same["effect"]) < 0.25
    assert np.isnan(mann_whitney(np.array([]), y)["p_value"])
