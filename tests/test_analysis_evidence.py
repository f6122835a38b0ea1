"""Which latents the claims rest on: chosen from the analysis' decisions, planted rows."""

from __future__ import annotations

import math

from branchlens.analysis.evidence import cell_latents, evidence_plan, matched_pairs


def _row(j, robust, q=0.01, ratio=0.5, alive=True):
    r = {"latent": j, "robust_dominant": robust, "alive": alive}
    for b in ("1x1", "5x5"):
        r |= {f"q_raw_{b}": q if b == robust else 1.0, f"q_scale_{b}": q if b == robust else 1.0,
              f"paper_ratio_{b}": ratio if b == robust else 0.1}
    return r


def test_cells_hold_robust_latents_most_significant_first():
    rows = [_row(0, "5x5", q=0.04), _row(1, "5x5", q=0.001), _row(2, "none"),
            _row(3, "1x1", q=0.02), _row(4, "5x5", q=0.001, ratio=0.9),
            _row(5, "5x5", q=1e-4, alive=False)]
    rows[0]["q_scale_5x5"] = math.nan  # one rule missing: the other decides
    assert cell_latents(rows, 2) == {"5x5": [4, 1], "1x1": [3]}
    assert cell_latents(rows, 10)["5x5"] == [4, 1, 0]
    assert cell_latents([_row(0, "none")], 3) == {}


def test_pairs_and_plan_cover_both_layers_of_each_match():
    summary = {"cross_layer": [{"layers": ["a", "b"], "matches": [[1, 7, 0.5], [2, 8, 0.9],
                                                                   [3, 9, 0.7]]},
                               {"layers": ["b"], "matches": [[0, 0, 1.0]]}]}
    pairs = matched_pairs(summary, 2)
    assert [(p["a"], p["b"]) for p in pairs] == [(2, 8), (3, 9)]
    assert matched_pairs(None, 3) == [] and matched_pairs({"cross_layer": []}, 3) == []
    plan = evidence_plan({"a": [_row(5, "5x5")], "b": [_row(6, "1x1")]}, summary, 1, 2)
    assert plan["a"]["latents"] == [2, 3, 5] and plan["b"]["latents"] == [6, 8, 9]
    assert plan["a"]["cells"] == {"5x5": [5]} and len(plan["b"]["pairs"]) == 2


def test_a_cap_keeps_every_cell_and_the_pairs_before_more_of_one_cell():
    plan = {"cells": {"1x1": [1, 2, 3], "5x5": [10, 11], "pool": [20]},
            "pairs": [{"up": "L", "down": "M", "a": 30, "b": 7, "corr": 0.9},
                      {"up": "K", "down": "L", "a": 8, "b": 31, "corr": 0.8}]}
    from branchlens.analysis.evidence import capped

    four = capped(plan, "L", per_cell=3, cap=4)  # best of each cell, then the first pair
    assert four["latents"] == [1, 10, 20, 30]
    assert four["cells"] == {"1x1": [1], "5x5": [10], "pool": [20]}
    assert [p["a"] for p in four["pairs"]] == [30]
    six = capped(plan, "L", per_cell=3, cap=6)  # both pairs (either side), then round-robin
    assert six["latents"] == [1, 2, 10, 20, 30, 31]
    assert len(six["pairs"]) == 2 and six["cells"]["1x1"] == [1, 2]
    assert capped(plan, "L", per_cell=3, cap=100)["latents"] == [1, 2, 3, 10, 11, 20, 30, 31]
    assert capped({"cells": {}, "pairs": []}, "L", 2, 5)["latents"] == []
