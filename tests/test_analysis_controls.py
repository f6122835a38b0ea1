"""Controls that can fail, on planted data: each one fails where it must and passes where the
structure is real (relabelling null, calibration, power with strata occupancy, data baseline)."""

from __future__ import annotations

import numpy as np
import pytest

from branchlens.analysis import controls as C

SLICES = {"1x1": slice(0, 16), "3x3": slice(16, 32), "5x5": slice(32, 48), "pool": slice(48, 64)}
D = 64


def _specialised(n: int, rng: np.random.Generator) -> np.ndarray:
    """Latents with most of their mass spread over one branch's channels."""
    v = rng.standard_normal((n, D)) * 0.3
    for i in range(n):
        s = list(SLICES.values())[i % 4]
        v[i, s] += rng.standard_normal(16) * 2.0
    return v


def test_relabelling_null_separates_real_partitions_from_random_ones():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 2.0, D)
    real = C.relabelling_null(_specialised(200, rng), SLICES, std=std, replicates=19,
                              n_perm=200, seed=1)
    assert real["p_value"] == pytest.approx(1 / 20)  # beats every random partition
    assert real["observed"] > 3 * real["null_max"]
    assert all(c["p_value"] == pytest.approx(1 / 20) for c in real["per_branch"].values())
    # heavy-tailed latents concentrated on channels with no regard to the branches: the real
    # partition is one more random one
    t = rng.standard_t(2, (200, D))
    null = C.relabelling_null(t, SLICES, std=std, replicates=19, n_perm=200, seed=1)
    assert null["p_value"] > 0.05 and null["null_mean"] > 0  # the null has hits too


def test_calibration_accepts_uniform_p_and_flags_excess():
    rng = np.random.default_rng(0)
    names = list(SLICES)
    ok = C.calibration(rng.uniform(size=(4000, 4)), names)
    assert ok["ok"] and ok["0.05"]["all"]["rate"] == pytest.approx(0.05, abs=0.01)
    bad = C.calibration(rng.uniform(size=(4000, 4)) ** 1.5, names)  # anti-conservative
    assert not bad["ok"] and not bad["0.05"]["all"]["ok"]
    conservative = C.calibration(np.sqrt(rng.uniform(size=(4000, 4))), names)
    assert conservative["ok"]  # fewer small p-values than nominal is allowed


def test_scale_power_is_high_in_mixed_strata_and_zero_where_a_branch_is_alone():
    rng = np.random.default_rng(0)
    mixed = rng.uniform(0.5, 2.0, D)
    cut = np.full(4, 0.01)
    res = C.scale_power(mixed, SLICES, cutoffs=cut, q=0.05, m=1000, n_planted=64, seed=0)
    for b, cell in res["branches"].items():
        assert cell["testable_for_scale"] and cell["power_scale"] >= 0.5, b
        assert cell["strata_alone"] == 0
    assert res["branches"]["5x5"]["power_scale_by_boost"]["1.5"] <= 1.0
    # 5x5 is the loudest branch by far: its channels fill the top strata alone, so permuting
    # within strata never moves its mass; the scale rule is blind there, and must say so
    loud = mixed.copy()
    loud[SLICES["5x5"]] += 10
    res = C.scale_power(loud, SLICES, cutoffs=cut, q=0.05, m=1000, n_planted=64, seed=0)
    cell = res["branches"]["5x5"]
    assert cell["strata_alone"] == 4 and cell["share_in_shared_strata"] == 0
    assert cell["power_scale"] == 0 and not cell["testable_for_scale"]
    assert cell["power_raw_by_boost"]["2.5"] > 0.9  # the raw rule still sees it


def test_scale_power_uses_the_first_discovery_cutoff_when_nothing_was_rejected():
    std = np.random.default_rng(1).uniform(0.5, 2.0, D)
    res = C.scale_power(std, SLICES, cutoffs=np.zeros(4), q=0.05, m=100, n_planted=16,
                        boosts=(2.5,), seed=0)
    assert res["branches"]["1x1"]["cutoff"] == pytest.approx(0.05 / 100)
    assert res["branches"]["1x1"]["n_perm"] >= 20 / (0.05 / 100)


def test_data_baseline_sees_a_branch_structured_covariance():
    names = list(SLICES)
    # SAE p-values with no discoveries at all
    p = np.ones((500, 4))
    tested = np.ones(500, bool)
    iid = C.data_baseline(p, p, tested, np.eye(D), SLICES, std=np.ones(D), n=500, n_perm=500)
    fam = iid["families"]["covariance_gaussian"]
    assert fam["robust_any"] <= 0.05 * 500 and fam["calibration_scale"]["ok"]
    iid_pool = fam["per_branch"]["pool"]
    # one branch's channels share a strong common factor (equal marginal σ, so the scale
    # rule sees it): the data alone is "specialised"
    block = np.eye(D)
    block[SLICES["pool"], SLICES["pool"]] = 0.1 * np.eye(16) + 0.9
    res = C.data_baseline(p, p, tested, block, SLICES, std=np.ones(D), n=500, n_perm=500)
    fam = res["families"]["covariance_gaussian"]
    assert fam["per_branch"]["pool"] > max(50, 5 * iid_pool)
    assert fam["sae_minus_data"]["difference"] < 0
    assert fam["sae_minus_data"]["p_value"] > 0.5
    assert res["families"]["principal"]["per_branch"]["pool"] >= 1  # the factor itself
    assert set(res["sae"]["per_branch"]) == set(names)


def test_covariance_matches_numpy():
    x = np.random.default_rng(0).standard_normal((300, 5))
    np.testing.assert_allclose(C.covariance(x), np.cov(x, rowvar=False))


def test_stratified_beta_tail_matches_monte_carlo_and_is_blind_where_the_rule_is():
    from branchlens.analysis.branches import branch_labels, permutation_pvalues, scale_strata

    rng = np.random.default_rng(3)
    std = rng.uniform(0.5, 2.0, D)
    labels, strata = branch_labels(SLICES, D), scale_strata(std, 8)
    v = rng.standard_normal((300, D)) * std
    v[:150, SLICES["5x5"]] *= 1.6
    beta = C.stratified_beta_pvalues(v, labels, 2, strata)
    mc = permutation_pvalues(v, SLICES, strata=strata, n_perm=20000, max_perm=20000).p[:, 2]
    ok = mc > 2e-3  # where Monte-Carlo resolves the tail
    assert np.median(np.abs(np.log10(beta[ok]) - np.log10(mc[ok]))) < 0.05
    assert np.mean((beta < 0.01) == (mc < 0.01)) > 0.9
    loud = std.copy()
    loud[SLICES["5x5"]] += 10  # 5x5 alone in its strata: no permutation moves it
    blind = C.stratified_beta_pvalues(v, labels, 2, scale_strata(loud, 4))
    assert np.all(blind == 1.0)


def test_power_beyond_monte_carlo_resolution_is_decided_by_the_beta_tail():
    # a layer of mixed4c's shape (widths 96/128/32/64): cut-off q/m = 5e-6, which 2000
    # permutations cannot reach (their smallest p is 5e-4)
    wide = {"1x1": slice(0, 96), "3x3": slice(96, 224), "5x5": slice(224, 256),
            "pool": slice(256, 320)}
    std = np.random.default_rng(1).uniform(0.5, 2.0, 320)
    res = C.scale_power(std, wide, cutoffs=np.zeros(4), q=0.05, m=10**4, n_planted=32,
                        max_perm=2000, seed=0)
    for b, cell in res["branches"].items():
        assert not cell["resolved"] and cell["tail"] == "beta"
        assert cell["power_scale"] >= 0.5, b  # seen by the Beta tail, not called blind
