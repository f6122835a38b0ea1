"""Branch ratios, null models and the decision rules on planted decoders with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from _synthetic import planted_decoder
from branchlens.analysis import branches as br
from branchlens.analysis.stats import bh_reject
from branchlens.variants import branch_slices

SL = branch_slices("bvlc_googlenet", "mixed4a")  # 192 | 208 | 48 | 64 = 512 channels
W = br.widths(SL)
D = int(W.sum())
Q = 0.05


def test_ratios_use_variant_slices_and_paper_definition():
    v = np.zeros((3, D))
    v[0, SL["5x5"]] = 1.0  # all in 5x5
    v[1, SL["1x1"]] = -1.0  # all negative: full ratio 1 in 1x1, paper ratio undefined
    v[2] = 1.0
    v[2, SL["pool"]] = -5.0  # positive part spread over the other branches only
    share = br.branch_shares(v, SL)
    pos = br.branch_shares(v, SL, positive=True)
    assert share[0].tolist() == [0, 0, 1, 0] and pos[0].tolist() == [0, 0, 1, 0]
    assert share[1, 0] == 1 and np.all(np.isnan(pos[1]))
    assert pos[2, 3] == 0
    np.testing.assert_allclose(pos[2, :3], W[:3] / W[:3].sum())
    np.testing.assert_allclose(np.nansum(share, 1), 1)
    with pytest.raises(ValueError):
        br.branch_labels({"a": slice(0, 3)}, 5)  # channels left uncovered


def test_isotropic_beta_is_exact_for_random_directions():
    v = np.random.default_rng(0).standard_normal((4000, D))
    p = br.isotropic_pvalues(br.branch_shares(v, SL), W)
    for b in range(len(W)):  # uniform p-values
        assert sps.kstest(p[:, b], "uniform").pvalue > 0.001


@pytest.fixture(scope="module")
def unbalanced():
    """Heavy-tailed, channel-scaled values like real decoders; half the planted latents in 5x5.

    A dictionary-relative scale (channel RMS over latents) is zero-sum: with half the planted
    mass in 5x5 it recovered 7 % of them in the audit. The raw rule must not care.
    """
    pl = planted_decoder(SL, 1600, 448, heavy=True, boost=5.0, channel_sigma=0.3,
                         planted_branches=["5x5", "5x5", "5x5", "1x1", "3x3", "pool"], seed=3)
    bt = br.analyze_branches(pl.decoder, SL, std=pl.channel_scale, n_perm=500)
    return pl, bt


def test_unbalanced_planting_is_recovered_on_the_primary_scale(unbalanced):
    pl, bt = unbalanced
    planted = pl.truth != br.NONE
    recall = np.mean(bt.dominant[planted] == pl.truth[planted])
    assert recall >= 0.8, recall
    five = pl.truth == list(SL).index("5x5")
    assert five.sum() >= 0.45 * planted.sum()
    assert np.mean(bt.dominant[five] == pl.truth[five]) >= 0.8
    # The descriptive dictionary scale deflates the branch the dictionary uses most.
    assert np.nanmean(bt.enrichment_dict[five, 2]) < np.nanmean(bt.enrichment[five, 2])
    # False discoveries among null latents stay at the BH level.
    disc = bt.dominant != br.NONE
    assert np.sum(disc & ~planted) / max(disc.sum(), 1) < 2 * Q
    # Channel scale is mild and random here: the scale rule keeps most of them (robust).
    assert np.mean(bt.robust_dominant[planted] == pl.truth[planted]) >= 0.7


def test_robust_label_is_the_best_branch_significant_under_both_rules(unbalanced):
    """A latent significant raw in a loud 1x1 (largest enrichment) and in 5x5, but robust only
    in 5x5, is a 5x5 latent: the label is never 'none' just because the raw argmax is loud."""
    from dataclasses import replace

    _, bt = unbalanced
    b1, b5 = list(SL).index("1x1"), list(SL).index("5x5")
    reject = np.zeros_like(bt.reject)
    scale = np.zeros_like(bt.reject)
    enr = np.ones_like(bt.enrichment)
    reject[0, [b1, b5]] = True  # raw: both; scale: 5x5 only; 1x1 more enriched
    scale[0, b5] = True
    enr[0, b1], enr[0, b5] = 3.0, 2.0
    reject[1, [b1, b5]] = True  # robust in both: the more enriched one
    scale[1, [b1, b5]] = True
    enr[1, b1], enr[1, b5] = 1.5, 2.5
    reject[2, b1] = True  # raw only: no robust label
    t = replace(bt, reject=reject, reject_scale=scale, enrichment=enr,
                dominant=br.dominant_branch(reject, enr))
    assert list(t.dominant[:3]) == [b1, b5, b1]
    assert list(t.robust_dominant[:4]) == [b5, b5, br.NONE, br.NONE]
    assert t.dominant_names(robust=True)[:3] == ["5x5", "5x5", "none"]


def test_small_true_count_is_found_without_a_pvalue_floor():
    # 15 specialised latents among 2048: BH needs p ≤ q·15/m ≈ 3.7e-4 — below 1/(1+1000),
    # so a fixed 1000-permutation floor would find none; the adaptive refinement must.
    pl = planted_decoder(SL, 2033, 15, heavy=False, boost=3.0, seed=11)
    res = br.permutation_pvalues(pl.decoder, SL, q=Q, n_perm=1000)
    rej, _ = bh_reject(res.p, Q)
    planted = np.flatnonzero(pl.truth != br.NONE)
    found = rej[planted, pl.truth[planted]]
    assert found.mean() >= 0.9, found.mean()
    assert rej[pl.truth == br.NONE].any(1).sum() <= 3
    assert res.n_perm[planted].min() > 1000 and np.median(res.n_perm) == 1000


def test_random_directions_through_every_rule_stay_below_q_m():
    std = np.exp(0.5 * np.random.default_rng(1).standard_normal(D))
    std[SL["pool"]] *= 0.6  # a quiet branch, as in real layers
    v = np.random.default_rng(2).standard_normal((1500, D))
    bt = br.analyze_branches(v, SL, std=std, n_perm=500)
    m = bt.tested.sum()
    for name, rej in (("raw", bt.reject), ("scale", bt.reject_scale),
                      ("paper", bt.reject_paper)):
        assert rej.any(1).sum() <= Q * m, name
    ctl = br.null_controls(v, SL, std=std, n_perm=500)
    for name, c in ctl.items():
        if not c.get("reference_only"):
            assert c["significant"] <= c["bound_q_m"], (name, c)
        if "calibration" in c and not c.get("reference_only"):
            assert c["calibration"]["ok"], (name, c["calibration"])  # binomial bound holds
    # --max-perm bounds the controls too (it bounded only the main test)
    capped = br.null_controls(v[:300], SL, std=std, n_perm=100, max_perm=200)
    assert max(c["permutations_max"] for c in capped.values()) <= 200


def test_scale_rule_explains_away_a_loud_branch():
    # Pool channels 1.6× louder in activation units, no planted latents at all: the raw rule
    # calls the loud branch specialised; the within-stratum rule does not.
    pl = planted_decoder(SL, 800, 0, heavy=True, branch_gain={"pool": 1.6}, seed=8)
    bt = br.analyze_branches(pl.decoder, SL, std=pl.channel_scale, n_perm=500)
    pool = list(SL).index("pool")
    assert bt.reject[:, pool].sum() > 50
    assert bt.reject_scale.any(1).sum() <= Q * 800
    assert bt.robust.any(1).sum() <= Q * 800
    rows = {r["branch"]: r for r in br.layer_table(bt)}
    pool_row = rows["pool"]
    assert pool_row["explained_by_scale"] == pool_row["significant"] - pool_row["robust"]
    ctl = br.null_controls(pl.decoder, SL, std=pl.channel_scale, n_perm=500)
    assert ctl["raw_rule_scaled_gaussian"]["per_branch"]["pool"] > 50  # what raw alone does
    assert ctl["scale_rule_scaled_gaussian"]["significant"] <= Q * 800


def test_dead_latents_are_not_tested():
    pl = planted_decoder(SL, 300, 60, heavy=True, boost=6.0, seed=4)
    include = np.ones(360, bool)
    include[:40] = False
    bt = br.analyze_branches(pl.decoder, SL, include=include, n_perm=300)
    assert np.all(np.isnan(bt.p_raw[:40])) and not bt.reject[:40].any()
    assert np.all(bt.dominant[:40] == br.NONE) and bt.tested.sum() == 320
    rows = br.layer_table(bt)
    assert rows[0]["tested"] == 320 and rows[0]["latents"] == 360
    # m in BH is the tested count: the same p-values with the dead rows dropped give the same
    # decisions.
    rej_alive, _ = bh_reject(bt.p_raw[40:], Q)
    np.testing.assert_array_equal(rej_alive, bt.reject[40:])


def test_same_channel_permutation_for_all_latents_gives_nominal_discoveries():
    pl = planted_decoder(SL, 800, 200, heavy=True, boost=6.0, channel_sigma=0.5, seed=3)
    perm = np.random.default_rng(7).permutation(D)
    res = br.permutation_pvalues(pl.decoder[:, perm], SL, n_perm=1000)
    rej, _ = bh_reject(res.p, Q)
    # Global null: BH at q gives P(any discovery) ≤ q, so a handful at most.
    assert rej.any(1).sum() <= 5
    assert 0.035 < np.mean(res.p < 0.05) < 0.065


def test_per_test_level_nominal_and_paper_ratio_needs_its_own_null():
    v = np.random.default_rng(2).standard_normal((1500, D))
    pos_share = br.branch_shares(v, SL, positive=True)
    wrong = br.isotropic_pvalues(pos_share, W)  # full-norm null reused for the paper ratio
    right = br.permutation_pvalues(v, SL, positive=True, n_perm=1000).p
    assert np.mean(wrong < 0.05) > 0.09
    assert 0.035 < np.mean(right < 0.05) < 0.065


def test_beta_approximation_matches_monte_carlo_in_the_tail():
    # Where decisions are made: MC p < 0.01, resolved with ≥ 10 exceedances.
    pl = planted_decoder(SL, 100, 300, heavy=False, boost=1.3, seed=5)
    mc = br.permutation_pvalues(pl.decoder, SL, n_perm=20000, max_perm=20000)
    beta = br.beta_approx_pvalues(pl.decoder, SL)
    tail = (mc.p < 0.01) & (mc.exceed >= 10)
    assert tail.sum() >= 40
    dlog = np.abs(np.log10(beta[tail]) - np.log10(mc.p[tail]))
    assert np.median(dlog) < 0.1 and np.quantile(dlog, 0.9) < 0.2, dlog


def test_isotropic_null_is_miscalibrated_on_heavy_tails():
    pl = planted_decoder(SL, 800, 0, heavy=True, channel_sigma=0.5, seed=3)
    p = br.isotropic_pvalues(br.branch_shares(pl.decoder, SL), W)
    assert np.mean(p < 0.05) > 0.15  # why it is never the decision rule


def test_effective_dimension_from_kurtosis():
    rng = np.random.default_rng(1)
    gauss = rng.standard_normal((200, 512))
    assert abs(np.median(br.effective_dimension(gauss)) / 512 - 1) < 0.1
    heavy_vals = rng.standard_t(2.5, (200, 512))
    assert np.median(br.effective_dimension(heavy_vals)) < 0.5 * 512


def test_dominant_uses_enrichment_not_size():
    reject = np.array([[True, True, False, False], [True, False, True, False],
                       [False, False, False, False]])
    enr = np.array([[1.1, 1.0, 0.9, 1.0], [1.3, 0.2, 4.0, 0.5], [0, 0, 9.0, 0]])
    assert br.dominant_branch(reject, enr).tolist() == [0, 2, br.NONE]


def test_layer_table_reports_1x1_against_channel_share(unbalanced):
    _, bt = unbalanced
    rows = br.layer_table(bt)
    assert [r["branch"] for r in rows] == list(SL)
    one = rows[0]
    assert one["channel_share"] == pytest.approx(192 / 512)
    assert one["significant"] >= one["dominant"] > 0
    assert one["expected_false_positives"] == pytest.approx(Q * one["significant"])
    enr = {r["branch"]: r["dominant_enrichment_vs_channel_share"] for r in rows}
    assert enr["5x5"] > enr["1x1"] and enr["5x5"] > enr["3x3"]


def test_ratio_null_brackets_null_curve_and_sees_a_planted_tail():
    null = planted_decoder(SL, 600, 0, heavy=True, seed=9)
    rn = br.ratio_null(null.decoder, SL, n_rep=200)
    assert rn["band"].shape == (2, 4, 600)
    r = np.sort(np.sqrt(np.nan_to_num(br.branch_shares(null.decoder, SL, True))), 0).T
    inside = (r >= rn["band"][0] - 0.02) & (r <= rn["band"][1] + 0.02)
    assert inside.mean() > 0.9
    five = rn["branches"]["5x5"]
    assert five["p_count_gt_0.5"] > 0.01 and five["p_median"] > 0.01
    assert five["null_median_q05"] <= five["null_median_mean"] <= five["null_median_q95"]
    pl = planted_decoder(SL, 500, 100, heavy=True, boost=8.0,
                         planted_branches=["5x5"], seed=9)
    five = br.ratio_null(pl.decoder, SL, n_rep=200)["branches"]["5x5"]
    assert five["count_gt_0.5"] > five["null_count_gt_0.5_q95"]
    assert five["p_count_gt_0.5"] < 0.01


def test_scale_strata_group_equal_scales():
    std = np.concatenate([np.full(256, 1.0), np.full(256, 2.0)])
    st = br.scale_strata(std, 2)
    assert set(st[:256]) == {0} and set(st[256:]) == {1}
    bank = br.label_bank(np.repeat([0, 1], 256), 50, np.random.default_rng(0), st)
    assert np.all(bank[:, :256] == 0) and np.all(bank[:, 256:] == 1)


def test_paper_ratio_test_refines_only_to_its_cap():
    pl = planted_decoder(SL, 300, 30, heavy=True, boost=6.0, seed=5)
    capped = br.analyze_branches(pl.decoder, SL, n_perm=200, paper_max_perm=400)
    assert np.nanmin(capped.p_paper) >= 1 / 401  # never refined past the cap
    full = br.analyze_branches(pl.decoder, SL, n_perm=200, paper_max_perm=None)
    assert np.nanmin(full.p_paper) < 1 / 401  # the planted ones need more: the cap is real
    np.testing.assert_array_equal(capped.reject, full.reject)  # no decision uses it


def test_the_control_refinement_cap_still_lets_a_control_fail():
    # a "null" family that is not null: 50 strongly planted among 250 directions; at the
    # controls' cap (4·m/q permutations) BH still finds them, so the control would fail
    pl = planted_decoder(SL, 200, 50, heavy=True, boost=6.0, seed=6)
    m = pl.decoder.shape[0]
    cap = int(np.ceil(br.CONTROL_PERM_FACTOR * m / Q))
    res = br.permutation_pvalues(pl.decoder, SL, q=Q, n_perm=200, max_perm=cap)
    rej, _ = br.bh_reject(res.p, Q)
    planted = pl.truth != br.NONE
    assert rej.any(1)[planted].mean() > 0.9 and res.n_perm.max() <= cap
    ctl = br.null_controls(pl.decoder, SL, n_perm=200)
    assert max(c["permutations_max"] for c in ctl.values()) <= cap


def _exact_pvalue(a: np.ndarray, width: int, strata: np.ndarray | None = None) -> float:
    """P(share of the first ``width`` channels ≥ observed) over every permutation (within
    strata), by enumerating which values land in that branch."""
    import itertools

    obs = a[:width].sum()
    groups = [np.arange(a.size)] if strata is None else [np.flatnonzero(strata == s)
                                                        for s in np.unique(strata)]
    sums = [0.0]
    for g in groups:
        k = int(np.sum(g < width))  # branch channels in this stratum
        sums = [s + sum(c) for s in sums for c in itertools.combinations(a[g], k)]
    return float(np.mean(np.array(sums) >= obs - 1e-9))


@pytest.mark.parametrize("stratified", [False, True])
def test_deep_refinement_rounds_give_the_exact_permutation_pvalue(stratified):
    """Rounds past ``bank_block`` draw value permutations against a fixed label bank: the
    p-values must still be those of the exact permutation null (enumerated here)."""
    rng = np.random.default_rng(3)
    d, width = 10, 3
    slices = {"a": slice(0, width), "b": slice(width, d)}
    strata = (np.arange(d) % 2) if stratified else None
    v = rng.exponential(1.0, (6, d))
    v[:, :width] *= np.linspace(1.0, 5.0, 6)[:, None]  # from null to specialised
    a = v * v / (v * v).sum(1, keepdims=True)
    exact = np.array([_exact_pvalue(r, width, strata) for r in a])
    res = br.permutation_pvalues(v, slices, strata=strata, n_perm=40_000, max_perm=40_000,
                              bank_block=1000, seed=5)  # one round of 40 000: the deep path
    assert (res.n_perm >= 40_000).all()
    se = np.sqrt(exact * (1 - exact) / res.n_perm) + 1 / res.n_perm
    assert np.all(np.abs(res.p[:, 0] - exact) < 5 * se), (res.p[:, 0], exact)
    assert exact.min() < 0.05 and exact.max() > 0.3  # the range the test covers


def test_deep_rounds_have_the_variance_of_independent_draws():
    """R value permutations × K bank permutations must count as R·K draws: over seeds the
    p-value spreads like a binomial of all of them, not of the K bank permutations alone."""
    rng = np.random.default_rng(7)
    d, width = 12, 4
    v = rng.exponential(1.0, (1, d))  # exact p = 0.58
    a = v[0] ** 2 / (v[0] ** 2).sum()
    exact = _exact_pvalue(a, width)
    slices = {"a": slice(0, width), "b": slice(width, d)}
    ps = [br.permutation_pvalues(v, slices, n_perm=8 * br.REFINE_BANK, max_perm=1,
                                 bank_block=1000, seed=s).p[0, 0] for s in range(12)]
    draws = 8 * br.REFINE_BANK
    assert 0.1 < exact < 0.9
    assert abs(np.mean(ps) - exact) < 4 * np.sqrt(exact * (1 - exact) / draws / 12)
    assert np.std(ps, ddof=1) < 1.6 * np.sqrt(exact * (1 - exact) / draws)  # K alone: 2.8×
