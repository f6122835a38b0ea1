"""`branchlens run`: stages run in order, record themselves in run.json, and are skipped when
their artifacts match the config (and re-run, with everything downstream, when it changes)."""

import json

import pytest
from typer.testing import CliRunner

from branchlens.cli import app
from branchlens.pipeline import make_config, run, stage_hash
from conftest import E2E_SETS

TINY = {k: E2E_SETS[k] for k in ("harvest", "sae", "train")}  # the shared run's first stages


@pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")
def test_stages_skip_when_up_to_date_and_rerun_downstream_of_a_change(tmp_path):
    out = tmp_path / "run"
    logs: list[str] = []
    kw = dict(source="embedded:6", weights="random", device="cpu", stages=["harvest", "train"],
              log=logs.append)
    rec = run(out, overrides=TINY, **kw)
    assert [rec["stages"][s]["status"] for s in ("harvest", "train")] == ["done", "done"]
    assert (out / "store" / "manifest.json").is_file()
    assert (out / "sae" / "mixed4b" / "cfg.json").is_file()
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["harvest"]["layers"] == ["mixed4a", "mixed4b"]
    assert saved["branchlens_version"] and saved["weights"] == "random"

    logs.clear()
    run(out, overrides=TINY, **kw)
    assert logs == ["[harvest] up to date, skipped", "[train] up to date, skipped"]

    # a record an earlier version wrote, whose hashes still counted train.plot: same run
    from branchlens.pipeline import LEGACY_NON_ARTIFACT

    plotted = {**TINY, "train": {**TINY["train"], "plot": False}}
    doc = json.loads((out / "run.json").read_text())
    cfg = {**doc["config"], "train": {**doc["config"]["train"], "plot": False}}
    for s in ("harvest", "train"):
        doc["stages"][s]["config_hash"] = stage_hash(cfg, s, "random", LEGACY_NON_ARTIFACT)
    assert doc["stages"]["train"]["config_hash"] != stage_hash(cfg, "train", "random")
    (out / "run.json").write_text(json.dumps(doc))
    logs.clear()
    run(out, overrides=plotted, **kw)
    assert logs == ["[harvest] up to date, skipped", "[train] up to date, skipped"]

    logs.clear()
    changed = {**TINY, "train": {**TINY["train"], "steps": 6}}
    rec = run(out, overrides=changed, **kw)
    assert logs[0] == "[harvest] up to date, skipped"
    assert "[train] running" in logs
    assert rec["stages"]["train"]["config_hash"] != saved["stages"]["train"]["config_hash"]


def test_upstream_change_changes_every_downstream_hash():
    a = make_config("demo")
    b = make_config("demo", overrides={"harvest": {"sampling": "norm"}})
    assert stage_hash(a, "harvest", None) != stage_hash(b, "harvest", None)
    assert stage_hash(a, "report", None) != stage_hash(b, "report", None)
    c = make_config("demo", overrides={"circuits": {"n_perm": 30}})
    assert stage_hash(a, "analyze", None) == stage_hash(c, "analyze", None)
    assert stage_hash(a, "report", None) != stage_hash(c, "report", None)


def test_bad_presets_and_overrides_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("fast")
    with pytest.raises(ValueError, match="needs an image SOURCE"):
        make_config("paper")
    r = CliRunner().invoke(app, ["run", "--out", str(tmp_path), "--set", "trainsteps=3"])
    assert r.exit_code != 0 and "STAGE.KEY=VALUE" in r.output


def test_every_stage_through_the_report_from_the_cli(e2e_run):
    out, r = e2e_run
    assert f"report: {(out / 'report' / 'index.html').resolve()}" in r.stdout
    rec = json.loads((out / "run.json").read_text())
    assert all(s["status"] == "done" for s in rec["stages"].values()), rec["stages"]
    assert list(rec["stages"]) == ["harvest", "train", "analyze", "visualize", "examples",
                                   "circuits", "report"]
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert summary["layers"] == ["mixed4a", "mixed4b"] and len(summary["claims"]) == 6
    assert summary["per_layer"]["mixed4b"]["latents"] == 512  # expansion 1 × 512 channels
    circ = json.loads((out / "viz" / "circuits" / "mixed4a__mixed4b.json").read_text())
    assert (circ["up"], circ["down"]) == ("mixed4a", "mixed4b") and circ["latents"]
    html = (out / "report" / "index.html").read_text()
    assert '<div class="banner" role="alert">RANDOM WEIGHTS' in html


def test_a_finished_run_is_up_to_date_stage_by_stage(e2e_run, tmp_path):
    """Run again unchanged, every stage is skipped: no stage's outputs are rewritten by a later
    one (which would make it 'changed' on every run), and run.json holds their digests."""
    import shutil
    import warnings

    out = tmp_path / "run"
    shutil.copytree(e2e_run[0], out)
    logs: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "RANDOM WEIGHTS")
        run(out, overrides=E2E_SETS, source="embedded:6", weights="random", device="cpu",
            log=logs.append)
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert logs == [f"[{s}] up to date, skipped" for s in stages], logs
    assert all(s["outputs"] for s in stages.values())
    assert stages["report"]["inputs"]["analyze"] and stages["train"]["inputs"]["harvest"]
