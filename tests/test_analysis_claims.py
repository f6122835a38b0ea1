"""The claims' decision rules on toy summaries: null inputs are not supported, untestable
layers and uninformative layer pairs are reported and never counted, each threshold's edge."""

from __future__ import annotations

import numpy as np
import pytest

from branchlens.analysis import claims as C

SHARES = {"1x1": 0.25, "3x3": 0.5, "5x5": 0.125, "pool": 0.125}


def _layer(robust=0, raw=0, tested=1000, control=0, dom=None, rdom=None, cat=None):
    """A per-layer summary as the driver writes it; robust/raw discoveries all in 5x5."""
    dom, rdom = dom or {}, rdom or {}
    branches = [{"branch": b, "channel_share": w, "significant": raw if b == "5x5" else 0,
                 "robust": robust if b == "5x5" else 0, "dominant": dom.get(b, 0),
                 "robust_dominant": rdom.get(b, 0)} for b, w in SHARES.items()]
    return {"tested": tested, "branches": branches,
            "null_controls": {"sigma": {"significant": control}},
            "category_test": cat or {}}


def test_specialisation_needs_every_testable_layer_at_its_threshold():
    need = 10
    ok = {"a": _layer(robust=need, raw=need), "b": _layer(robust=50, raw=60)}
    assert C.specialisation(ok, 0.05)["verdict"] == "supported"
    edge = ok | {"b": _layer(robust=need - 1, raw=need - 1)}
    assert C.specialisation(edge, 0.05)["verdict"] == "not supported"  # one layer fails
    null = {la: _layer() for la in "abcde"}
    assert C.specialisation(null, 0.05)["verdict"] == "not supported"
    controls = ok | {"b": _layer(robust=15, raw=15, control=8)}  # needs 2 × 8 = 16
    assert C.specialisation(controls, 0.05)["verdict"] == "not supported"
    scale = ok | {"b": _layer(robust=2, raw=40)}
    assert C.specialisation(scale, 0.05)["verdict"] == "explained by channel scale"
    untestable = ok | {"c": _layer(tested=3)}  # reported, never a failure
    res = C.specialisation(untestable, 0.05)
    assert res["verdict"] == "supported" and res["numbers"]["per_layer"]["c"]["status"] == \
        "not testable"
    res = C.specialisation({"c": _layer(tested=0)}, 0.05)
    assert res["verdict"] == "not testable" and res["evidence"].startswith("not testable: ")


def test_wilson_interval():
    lo, hi = C.wilson(0, 100)
    assert lo == 0 and 0.03 < hi < 0.04
    lo, hi = C.wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert C.wilson(0, 0) == (0.0, 1.0)


def test_five_by_five_leads_only_with_an_interval_above_width():
    lead = _layer(rdom={"5x5": 60, "1x1": 30, "3x3": 40}, dom={"5x5": 60}, tested=200)
    res = C.five_by_five({"a": lead, "b": lead, "c": _layer(rdom={"3x3": 200}, tested=200)})
    assert res["verdict"] == "supported" and res["numbers"]["status"]["c"] == "not supported"
    cell = res["numbers"]["per_layer"]["a"]["5x5"]["robust_dominant"]
    assert cell["enrichment"] == pytest.approx(60 / 130 / 0.125)  # share of labelled / width
    lo, hi = cell["enrichment_ci"]
    assert lo < cell["enrichment"] < hi
    few = _layer(rdom={"5x5": 3})  # below MIN_LATENTS labelled latents: not testable
    assert C.five_by_five({"a": few})["verdict"] == "not testable"
    # 5x5 largest but its interval reaches below 1 (2 of 7 labelled latents, width 0.125)
    weak = _layer(rdom={"5x5": 2, "1x1": 2, "3x3": 2, "pool": 1}, dom={})
    assert C.five_by_five({"a": weak})["verdict"] == "not supported"
    raw_only = _layer(rdom={"3x3": 100}, dom={"5x5": 300})
    assert C.five_by_five({"a": raw_only})["verdict"] == "explained by channel scale"
    ones = _layer(rdom={"5x5": 100, "1x1": 200}, tested=400)
    assert C.five_by_five({"a": ones})["numbers"]["one_1x1_layers"] == ["a"]


def _cat(n, diff, lo, hi, sig, other=0.4):
    return {"latents": n, "difference": diff, "ci_low": lo, "ci_high": hi, "significant": sig,
            "animal_fraction": other + diff, "other_fraction": other, "base_rate": other,
            "q_value_layers_x_branches": 0.01 if sig else 0.5}


def test_animals_counts_only_testable_layers_and_pools():
    good = {"robust_dominant": {"5x5": _cat(20, 0.3, 0.2, 0.4, True)}}
    none = {"robust_dominant": {"5x5": {"latents": 0}}}
    per = {"a": _layer(cat=good), "b": _layer(cat=none), "c": _layer(cat=none)}
    res = C.animals(per)
    assert res["verdict"] == "supported"  # b, c have no robust 5x5 latents: not failures
    assert res["numbers"]["status"] == {"a": "supported", "b": "not testable",
                                        "c": "not testable"}
    assert C.animals({"b": _layer(cat=none)})["verdict"] == "not testable"
    flat = {"robust_dominant": {"5x5": _cat(20, 0.01, -0.1, 0.12, False)}}
    res = C.animals({"a": _layer(cat=flat), "d": _layer(cat=good)})
    assert res["verdict"] == "not supported"  # 1 of 2 is not most
    pooled = res["numbers"]["pooled"]
    assert pooled["layers"] == 2 and 0.01 < pooled["difference"] < 0.3


def _cross(table, shifted_agreement=None, shifted_pairs=0):
    t = np.asarray(table)
    return {"layers": ["a", "b"], "shifted_image_null": {
        "pairs_above_threshold_per_replicate": [0]}, "consistency": {
        "pairs_both_dominant": int(t.sum()), "agreement": float(np.trace(t) / max(t.sum(), 1)),
        "null_mean": 0.25, "kappa": 0.0, "p_value": 0.5, "table": t.tolist(),
        "vs_shifted_image_matching": {"null_agreement": shifted_agreement,
                                      "null_pairs_both_dominant": shifted_pairs}}}


def test_across_layers_pools_informative_pairs_only():
    agree = np.diag([6, 6, 0, 0]) + 1  # 12 + 4 agreeing of 28: strong diagonal
    res = C.across_layers([_cross(agree), _cross(agree)])
    assert res["verdict"] == "supported" and res["numbers"]["pooled"]["p_value"] < 0.01
    lo, hi = res["numbers"]["pooled"]["excess_ci"]
    assert 0 < lo < res["numbers"]["pooled"]["excess"] < hi
    # one label on a side: every pair "agrees", no information; excluded and counted
    one_label = [[30, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    res = C.across_layers([_cross(one_label)] * 3)
    assert res["verdict"] == "not testable" and len(res["numbers"]["excluded_pairs"]) == 3
    assert res["evidence"].startswith("not testable: 0 matched pairs")
    # independent labels: the rule does not pass on chance agreement
    rng = np.random.default_rng(0)
    indep = np.histogram2d(rng.integers(0, 4, 400), rng.integers(0, 4, 400), bins=4)[0]
    assert C.across_layers([_cross(indep.astype(int))])["verdict"] == "not supported"
    # a non-adjacent pair (mixed4a↔4e) is reported, never pooled
    far = _cross(agree) | {"adjacent": False, "layers": ["a", "e"]}
    res = C.across_layers([_cross(agree), _cross(agree), far])
    assert res["numbers"]["pooled"]["pairs"] == 2 * int(agree.sum())
    assert res["numbers"]["per_pair"]["a↔e"]["reference_only"]
    # too few pooled pairs: not testable, however strong
    assert C.across_layers([_cross(np.diag([2, 2, 1, 0]))])["verdict"] == "not testable"
    # the matching on shifted images agrees as often: not supported
    res = C.across_layers([_cross(agree, shifted_agreement=16 / 28, shifted_pairs=280)] * 2)
    assert res["verdict"] == "not supported" and res["numbers"]["p_value_vs_shifted"] > 0.05


def _controlled(layer, relab_p=None, vs_data=None, blind=()):
    """Add the controls the driver writes: relabelling null, data baseline, power."""
    if relab_p is not None:
        layer["relabelling_null"] = {"p_value": relab_p, "observed": 100, "null_mean": 20.0}
    if vs_data is not None:
        diff, p = vs_data
        layer["data_baseline"] = {"families": {"covariance_gaussian": {"sae_minus_data": {
            "difference": diff, "ci": [diff - 0.01, diff + 0.01], "p_value": p}}}}
    layer["power"] = {"branches": {b: {"testable_for_scale": b not in blind} for b in SHARES}}
    return layer


def test_specialisation_must_beat_the_relabelling_null_and_the_data_baseline():
    good = _controlled(_layer(robust=50, raw=60), relab_p=0.024, vs_data=(0.05, 1e-6))
    assert C.specialisation({"a": good}, 0.05)["verdict"] == "supported"
    relab = _controlled(_layer(robust=50, raw=60), relab_p=0.3, vs_data=(0.05, 1e-6))
    assert C.specialisation({"a": good, "b": relab}, 0.05)["verdict"] == "not supported"
    edge = _controlled(_layer(robust=50, raw=60), relab_p=0.05, vs_data=(0.05, 1e-6))
    assert C.specialisation({"a": edge}, 0.05)["verdict"] == "supported"  # p ≤ 0.05 passes
    data = _controlled(_layer(robust=50, raw=60), relab_p=0.024, vs_data=(-0.02, 0.9))
    res = C.specialisation({"a": data}, 0.05)
    assert res["verdict"] == "not supported" and "covariance directions" in res["evidence"]
    # raw-only discoveries where the scale rule is blind: not testable, never "by scale"
    blind = _controlled(_layer(robust=2, raw=40), relab_p=0.024, vs_data=(0.05, 1e-6),
                        blind=("5x5",))
    res = C.specialisation({"a": good, "b": blind}, 0.05)
    assert res["numbers"]["per_layer"]["b"]["status"] == "not testable"
    assert "blind" in res["numbers"]["per_layer"]["b"]["why"] and res["verdict"] == "supported"
    seeing = _controlled(_layer(robust=2, raw=40), blind=("1x1",))  # blind elsewhere only
    assert C.specialisation({"a": seeing}, 0.05)["verdict"] == "explained by channel scale"


def test_five_by_five_raw_only_lead_is_not_testable_where_the_scale_rule_is_blind():
    raw_only = _layer(rdom={"3x3": 100}, dom={"5x5": 300})
    assert C.five_by_five({"a": _controlled(raw_only)})["verdict"] == \
        "explained by channel scale"
    blind = _controlled(_layer(rdom={"3x3": 100}, dom={"5x5": 300}), blind=("5x5",))
    assert C.five_by_five({"a": blind})["verdict"] == "not testable"


def test_claims_are_decided_on_the_paper_layers_only():
    good = _controlled(_layer(robust=50, raw=60), relab_p=0.024, vs_data=(0.05, 1e-6))
    other = {"mixed3a": good, "mixed4c_5x5": good}
    res = C.paper_claims(other, [], 0.05)
    assert [c["id"] for c in res] == [cid for cid, _ in C.CLAIMS]
    assert all(c["verdict"] == "not testable" and "mixed4a" in c["evidence"] for c in res)
    mixed = C.paper_claims({"mixed3a": _layer(), "mixed4b": good}, [], 0.05)
    spec = mixed[0]
    assert spec["verdict"] == "supported" and list(spec["numbers"]["per_layer"]) == ["mixed4b"]


def test_too_few_heldout_images_make_a_layer_not_testable():
    few = _controlled(_layer(robust=50, raw=60), relab_p=0.024, vs_data=(0.05, 1e-6))
    few["heldout_images"] = 1
    res = C.specialisation({"a": few}, 0.05)
    assert res["verdict"] == "not testable"
    assert "1 held-out images" in res["numbers"]["per_layer"]["a"]["why"]
    good = {"robust_dominant": {"5x5": _cat(20, 0.3, 0.2, 0.4, True)}}
    lay = _layer(cat=good)
    lay["heldout_images"] = 1
    assert C.animals({"a": lay})["verdict"] == "not testable"
