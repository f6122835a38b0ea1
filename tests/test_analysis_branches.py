"""Branch ratios, null models and the detection rule on planted decoders with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from branchlens.analysis import branches as br
from branchlens.analysis.stats import bh_reject
from branchlens.analysis.synthetic import planted_decoder
from branchlens.variants import branch_slices

SL = branch_slices("bvlc_googlenet", "mixed4a")  # 192 | 208 | 48 | 64 = 512 channels
W = br.widths(SL)
FAST = dict(n_perm=1000, refine_to=5000)


def test_ratios_use_variant_slices_and_paper_definition():
    d = int(W.sum())
    v = np.zeros((3, d))
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
    v = np.random.default_rng(0).standard_normal((4000, int(W.sum())))
    p = br.isotropic_pvalues(br.branch_shares(v, SL), W)
    for b in range(len(W)):  # uniform p-values
        assert sps.kstest(p[:, b], "uniform").pvalue > 0.001


@pytest.fixture(scope="module")
def heavy():
    """Heavy-tailed, sparse, channel-scaled values like real decoders; 20 % planted."""
    pl = planted_decoder(SL, 800, 200, heavy=True, boost=6.0, channel_sigma=0.5, seed=3)
    bt = br.analyze_branches(pl.decoder, SL, std=pl.channel_scale, other_scales=False, **FAST)
    return pl, bt


@pytest.fixture(scope="module")
def isotropic():
    pl = planted_decoder(SL, 800, 200, heavy=False, boost=2.5, seed=4)
    return pl, br.analyze_branches(pl.decoder, SL, **FAST)


@pytest.mark.parametrize("case", ["heavy", "isotropic"])
def test_false_positive_rate_nominal_and_power(case, request):
    pl, bt = request.getfixturevalue(case)
    null = pl.truth == br.NONE
    # Per-test level on null latents ≈ nominal, for both statistics.
    for p in (bt.p_perm, bt.p_perm_paper):
        fpr = np.mean(p[null] < 0.05)
        assert 0.035 < fpr < 0.065, fpr
    # Power: planted latents found, in their planted branch.
    power = np.mean(bt.dominant[~null] == pl.truth[~null])
    assert power >= 0.95, power
    # BH-level false discoveries among null latents (FDR ≤ q·m0/m = 0.04 expected).
    disc = bt.dominant != br.NONE
    fdp = np.sum(disc & null) / max(disc.sum(), 1)
    assert fdp < 0.08, fdp


def test_isotropic_null_is_miscalibrated_on_heavy_tails(heavy):
    pl, bt = heavy
    null = pl.truth == br.NONE
    # The reference test flags far too many null latents: why it is never the decision rule.
    assert np.mean(bt.p_iso[null] < 0.05) > 0.15


def test_same_channel_permutation_for_all_latents_gives_nominal_discoveries(heavy):
    pl, _ = heavy
    dec = br.std_normalise(pl.decoder, pl.channel_scale)
    perm = np.random.default_rng(7).permutation(dec.shape[1])
    res = br.permutation_pvalues(dec[:, perm], SL, **FAST)
    rej, _ = bh_reject(res.p, 0.05)
    # Global null: BH at q gives P(any discovery) ≤ q, so a handful at most.
    assert rej.any(1).sum() <= 5
    assert 0.035 < np.mean(res.p < 0.05) < 0.065


def test_scale_control_removes_loud_branch_artifact():
    # Pool channels 1.6× louder for every latent, no planted latents at all.
    pl = planted_decoder(SL, 600, 0, heavy=True, branch_gain={"pool": 1.6}, seed=8)
    bt = br.analyze_branches(pl.decoder, SL, std=pl.channel_scale, **FAST)
    assert bt.scale == "dict"
    pool = list(SL).index("pool")
    raw_rej, _ = bh_reject(bt.p_perm_scales["raw"], 0.05)
    assert raw_rej[:, pool].sum() > 50  # loud branch looks "specialized" in raw units
    assert bt.reject.any(1).sum() <= 5  # dictionary-normalised decision: nominal
    std_rej, _ = bh_reject(bt.p_perm_scales["std"], 0.05)
    assert std_rej.any(1).sum() <= 5  # here the std is exactly the loudness


def test_std_normalisation_inflates_quiet_branches_of_random_directions():
    # Seen on real decoders: dividing raw directions by a smaller std enriches that branch for
    # every latent; the dictionary normalisation does not.
    v = np.random.default_rng(3).standard_normal((600, int(W.sum())))
    std = np.ones(int(W.sum()))
    std[SL["pool"]] = 0.75  # pool ~25 % quieter, as in mixed4a
    bt = br.analyze_branches(v, SL, std=std, **FAST)
    std_rej, _ = bh_reject(bt.p_perm_scales["std"], 0.05)
    assert std_rej[:, list(SL).index("pool")].sum() > 300
    assert bt.reject.any(1).sum() <= 5


def test_beta_approximation_matches_monte_carlo():
    for heavy_vals, tol_mean in ((False, 0.01), (True, 0.06)):
        pl = planted_decoder(SL, 300, 60, heavy=heavy_vals, boost=3.0, seed=5)
        for positive in (False, True):
            mc = br.permutation_pvalues(pl.decoder, SL, positive=positive, n_perm=4000,
                                        refine_to=4000)
            beta = br.beta_approx_pvalues(pl.decoder, SL, positive=positive)
            ok = mc.p >= 0.01  # where Monte-Carlo resolves p well
            err = np.abs(beta[ok] - mc.p[ok])
            assert err.mean() < tol_mean, (heavy_vals, positive, err.mean())
            dlog = np.abs(np.log10(beta[ok]) - np.log10(mc.p[ok]))
            assert np.median(dlog) < 0.05
            agree = np.mean((beta < 0.05) == (mc.p < 0.05))
            assert agree > 0.95


def test_effective_dimension_from_kurtosis():
    rng = np.random.default_rng(1)
    gauss = rng.standard_normal((200, 512))
    assert abs(np.median(br.effective_dimension(gauss)) / 512 - 1) < 0.1
    heavy_vals = rng.standard_t(2.5, (200, 512))
    assert np.median(br.effective_dimension(heavy_vals)) < 0.5 * 512


def test_paper_ratio_needs_its_own_null():
    # Gaussian directions: the full-norm null is isotropic, but relu halves the support, so
    # the positive-part statistic is wider than the full-norm null says.
    v = np.random.default_rng(2).standard_normal((1500, int(W.sum())))
    pos_share = br.branch_shares(v, SL, positive=True)
    wrong = br.isotropic_pvalues(pos_share, W)  # full-norm null reused for the paper ratio
    right = br.permutation_pvalues(v, SL, positive=True, **FAST).p
    assert np.mean(wrong < 0.05) > 0.09
    assert 0.035 < np.mean(right < 0.05) < 0.065


def test_dominant_uses_enrichment_not_size():
    # A latent spread evenly over channels has its largest *ratio* in the widest branch (1x1
    # or 3x3) but no enrichment; a 5x5-concentrated one must be called 5x5.
    reject = np.array([[True, True, False, False], [True, False, True, False],
                       [False, False, False, False]])
    enr = np.array([[1.1, 1.0, 0.9, 1.0], [1.3, 0.2, 4.0, 0.5], [0, 0, 9.0, 0]])
    assert br.dominant_branch(reject, enr).tolist() == [0, 2, br.NONE]


def test_layer_table_reports_1x1_against_channel_share(heavy):
    pl, bt = heavy
    rows = br.layer_table(bt)
    assert [r["branch"] for r in rows] == list(SL)
    one = rows[0]
    assert one["channel_share"] == pytest.approx(192 / 512)
    assert one["significant"] >= one["dominant"] > 0
    assert one["expected_false_positives"] == pytest.approx(0.05 * one["significant"])
    # Planted latents are spread evenly over branches, so dominance relative to channel share
    # is highest for the narrowest branch (5x5) and lowest for the widest (3x3/1x1).
    enr = {r["branch"]: r["dominant_enrichment_vs_channel_share"] for r in rows}
    assert enr["5x5"] > enr["1x1"] and enr["5x5"] > enr["3x3"]


def test_null_band_brackets_null_curve():
    pl = planted_decoder(SL, 300, 0, heavy=True, seed=9)
    band = br.null_band(pl.decoder, SL, n_rep=10)
    assert band.shape == (2, 4, 300)
    r = np.sort(np.sqrt(np.nan_to_num(br.branch_shares(pl.decoder, SL, True))), 0).T
    inside = (r >= band[0] - 0.02) & (r <= band[1] + 0.02)
    assert inside.mean() > 0.9
