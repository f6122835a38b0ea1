"""Stability across SAE seeds: matching, label replication, near-duplicates, claim agreement,
and ``branchlens stability`` end to end on the tiny e2e run (resumable, bad input refused)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from branchlens.analysis import stability as S
from branchlens.cli import app

BR = ["1x1", "3x3", "5x5", "pool"]


def test_best_matches_recover_a_permuted_noisy_dictionary():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 64))
    perm = rng.permutation(300)
    b = a[perm] * 2.0 + 0.05 * rng.standard_normal((300, 64))  # scale does not matter
    match, cos = S.best_matches(a, b, chunk=128)
    np.testing.assert_array_equal(perm[match], np.arange(300))
    assert cos.min() > 0.99
    _, far = S.best_matches(a, rng.standard_normal((300, 64)))
    assert far.max() < S.MATCH_COS  # independent random directions are no match


def test_near_duplicates_counts_latents_with_a_close_twin():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 64))
    a[10] = a[3] + 0.01 * rng.standard_normal(64)
    a[20] = -a[4]  # opposite is not a duplicate
    assert S.near_duplicates(a, chunk=32) == 2


def test_label_replication_counts_matched_and_same_labelled_latents():
    labels = np.array([2, 2, 2, 0, -1, 1])
    other = np.array([2, 0, 2, 0, 3, 1])
    match = np.array([0, 1, 2, 3, 4, 5])
    cos = np.array([0.9, 0.9, 0.5, 0.95, 0.9, 0.9])  # latent 2 has no match
    alive = np.array([1, 1, 1, 1, 1, 0], bool)  # latent 5 not tested
    r = S.label_replication(labels, other, match, cos, BR, alive)
    assert r["latents"] == 5 and r["matched"] == 4
    assert r["per_branch"]["5x5"] == {"latents": 3, "matched": 2, "same_label": 1,
                                      "same_label_fraction": 0.5}
    assert r["labelled"]["matched"] == 3 and r["labelled"]["same_label"] == 2
    assert r["per_branch"]["3x3"]["latents"] == 0 and \
        r["per_branch"]["3x3"]["same_label_fraction"] is None


def test_claim_stability_says_when_a_verdict_does_not_replicate():
    main = [{"id": "a", "verdict": "supported"}, {"id": "b", "verdict": "supported"}]
    reps = [[{"id": "a", "verdict": "supported"}, {"id": "b", "verdict": "not supported"}],
            [{"id": "a", "verdict": "supported"}, {"id": "b", "verdict": "supported"}]]
    res = S.claim_stability(main, reps, ["mixed4b", "mixed4c"])
    assert res["a"]["stable"] and res["a"]["agree"] == 3 and res["a"]["summary"].startswith("3/3")
    assert not res["b"]["stable"] and res["b"]["agree"] == 2
    assert res["b"]["summary"].startswith("does not replicate")


@pytest.fixture(scope="module")
def stable_run(e2e_run, tmp_path_factory):
    src, _ = e2e_run
    run = tmp_path_factory.mktemp("stab") / "run"
    shutil.copytree(src, run, symlinks=True)
    r = CliRunner().invoke(app, ["stability", str(run), "--replicates", "2"])
    assert r.exit_code == 0, r.output
    return run, r.output


def test_stability_command_end_to_end(stable_run):
    run, output = stable_run
    res = json.loads((run / "analysis" / "stability.json").read_text())
    assert res["replicates"] == 2 and res["seeds"] == [0, 1]
    rep = run / "replicates" / "seed1"
    assert (rep / "store").is_symlink() and (rep / "store").resolve() == (run / "store").resolve()
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    for c in summary["claims"]:  # every claim carries its stability entry ...
        if c["verdict"] == "not run":  # ... but one whose stage has not run (effects)
            assert "stability" not in c and c["id"] == "animals_causal"
            continue
        st = c["stability"]
        assert st["replicates"] == 2 and len(st["verdicts"]) == 2
        assert st["layers"] == res["layers"]
    for r in res["per_layer"].values():
        n = r["latents"]
        assert len(r["label_replicates"]) == n
        assert 0 <= r["replicates"]["seed1"]["matched"] <= n
    assert "SAE seeds" in output
    # the report shows it next to each claim and per layer
    from branchlens.report import build_report

    page = build_report(run).read_text()
    assert "across SAE seeds" in page and "Across SAE seeds" in page


def test_stability_resumes_and_refuses_bad_input(stable_run):
    run, _ = stable_run
    w = run / "replicates" / "seed1" / "sae" / "mixed4a" / "weights.safetensors"
    before = w.stat().st_mtime_ns
    r = CliRunner().invoke(app, ["stability", str(run), "--replicates", "2"])
    assert r.exit_code == 0, r.output
    assert w.stat().st_mtime_ns == before  # the finished replicate was reused
    bad = CliRunner().invoke(app, ["stability", str(run), "--replicates", "1"])
    assert bad.exit_code == 2 and "--replicates >= 2" in bad.output
    bad = CliRunner().invoke(app, ["stability", str(run), "--layers", "mixed5b"])
    assert bad.exit_code == 2 and "not analysed" in bad.output
