import json
import os
import shutil

from typer.testing import CliRunner

from branchlens.cli import app

runner = CliRunner()


def test_info_json_matches_the_documented_shape():
    r = runner.invoke(app, ["info", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["variant"] == "bvlc_googlenet"
    assert d["layers"]["mixed4c"]["channels"] == 512
    assert d["layers"]["mixed4c"]["branches"] == {
        "1x1": [0, 128], "3x3": [128, 384], "5x5": [384, 448], "pool": [448, 512]}
    d5 = json.loads(runner.invoke(app, ["info", "--json", "--variant", "inception5h"]).stdout)
    assert d5["layers"]["mixed4a"]["channels"] == 508


def test_classify_json_on_a_labelled_folder(tmp_path, bvlc_weights, imagenet_sample):
    for name in sorted(p.name for p in imagenet_sample.glob("*.JPEG"))[:6]:
        shutil.copy(imagenet_sample / name, tmp_path / name)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    r = runner.invoke(app, ["classify", str(tmp_path), "--weights", str(bvlc_weights),
                            "--json", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    final = lines[-1]
    assert set(final) == {"n", "top1", "top5", "skipped"}
    assert final["n"] == 6 and final["skipped"] == 1 and final["top5"] >= 5
    assert all(len(p["top5"]) == 5 for p in lines[:-1])


def test_classify_with_random_weights_warns(tmp_path):
    r = runner.invoke(app, ["classify", "embedded:2", "--weights", "random", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "random weights" in r.output


def test_source_errors_come_before_the_weights_in_one_line(tmp_path):
    """A bad source is refused before any weights are looked for (the weights path is bad too)."""
    no_weights = str(tmp_path / "nowhere.safetensors")
    for cmd in (["harvest", f"wds:{tmp_path}/shard-{{0..2}}.tar", "--out", str(tmp_path / "s")],
                ["classify", f"wds:{tmp_path}/shard-{{0..2}}.tar"],
                ["classify", "embedded:2", "--image-key", "img"]):
        r = runner.invoke(app, [*cmd, "--weights", no_weights])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[0].startswith("error: ") and "nowhere" not in r.stderr, r.stderr
        assert "shards not found" in lines[0] or "hf: sources only" in lines[0]
        assert not (tmp_path / "s").exists()


def test_presets_print_as_toml_configs_that_rebuild_the_preset(tmp_path):
    from branchlens.config import load_config_file
    from branchlens.pipeline import PRESETS, make_config

    listing = json.loads(runner.invoke(app, ["presets", "--json"]).stdout)
    assert set(listing) == set(PRESETS) and listing["demo"]["train"]["steps"] == 300
    for name in PRESETS:
        r = runner.invoke(app, ["presets", name])
        assert r.exit_code == 0, r.output
        (tmp_path / f"{name}.toml").write_text(r.stdout)
        over = load_config_file(tmp_path / f"{name}.toml")
        assert make_config(None, "embedded:4", overrides=over) == \
            make_config(name, "embedded:4")
    r = runner.invoke(app, ["presets", "nope"])
    assert r.exit_code == 2 and "unknown preset 'nope'" in r.stderr


def test_config_file_and_run_json_go_through_the_schema(tmp_path):
    from branchlens.config import load_config_file
    from branchlens.pipeline import make_config

    cfg = make_config("demo", overrides={"train": {"steps": 7}, "sae": {"k": 8}})
    (tmp_path / "run.json").write_text(json.dumps({"config": cfg, "stages": {}}))
    assert make_config(None, overrides=load_config_file(tmp_path / "run.json")) == cfg
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "sample16x"\nsource = "embedded:8"\n[train]\nsteps = 5\n')
    got = make_config(None, overrides=load_config_file(toml))
    assert got["preset"] == "sample16x" and got["train"]["steps"] == 5
    assert got["train"]["batch_size"] == 4096  # the rest of the preset stays
    for text, msg in (('[train]\nstepz = 5\n', "unknown setting train.stepz"),
                      ('[train]\nsteps = "many"\n', "train.steps must be"),
                      ('[train\n', "invalid TOML")):
        toml.write_text(text)
        r = runner.invoke(app, ["run", "--config", str(toml), "--out", str(tmp_path / "r")])
        assert r.exit_code == 2 and msg in r.stderr, r.output
        assert r.stderr.strip().splitlines()[0].startswith("error: ")
    assert not (tmp_path / "r").exists()


def test_version_verbosity_and_completion_options():
    from branchlens import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"branchlens {__version__}"
    help_text = runner.invoke(app, ["--help"]).stdout
    for opt in ("--verbose", "--quiet", "--install-completion", "--version"):
        assert opt in help_text


def test_json_results_are_the_only_stdout_and_only_rank_0_prints(tmp_path, monkeypatch):
    r = runner.invoke(app, ["-q", "presets", "demo", "--json"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1
    assert json.loads(r.stdout)["demo"]["preset"] == "demo"
    monkeypatch.setenv("RANK", "1")
    r = runner.invoke(app, ["info", "--json"])
    assert r.exit_code == 0 and r.stdout == ""
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0 and r.stdout == ""


def test_ranks_other_than_0_write_no_run_level_file(tmp_path, monkeypatch):
    from branchlens.pipeline import run

    monkeypatch.setenv("RANK", "1")
    record = run(tmp_path / "r", preset="demo", stages=["analyze", "report"])
    assert record == {"stages": {}} and list((tmp_path / "r").iterdir()) == []


def test_torchrun_run_two_ranks_one_record_and_one_result_line(tmp_path):
    """Both ranks harvest and train on one process group; rank 0 alone prints and writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = tmp_path / "tiny.toml"
    cfg.write_text('source = "embedded:6"\nstages = ["harvest", "train"]\n'
                   '[harvest]\nlayers = ["mixed3a"]\nbatch_size = 3\n[sae]\nexpansion = 1\n'
                   'k = 8\n[train]\nbatch_size = 64\nsteps = 4\nwarmup_steps = 1\n'
                   'log_every = 2\nckpt_every = 2\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone",
                        "--nproc-per-node", "2", "-m", "branchlens", "-q", "run", "--config",
                        str(cfg), "--out", str(tmp_path / "r"), "--weights", "random",
                        "--device", "cpu", "--json"], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = r.stdout.splitlines()
    assert json.loads(line)["stages"] == {"harvest": "done", "train": "done"}
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["stages"]["harvest"]["info"]["images"] == 6
    assert (tmp_path / "r" / "sae" / "mixed3a" / "weights.safetensors").is_file()


def _copy_run(e2e_run, tmp_path):
    src, _ = e2e_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_visualize_refuses_bad_targets_in_one_line_before_rendering(e2e_run, tmp_path):
    run = str(_copy_run(e2e_run, tmp_path))
    from branchlens.sae import TopKSAE

    sae = TopKSAE.load(tmp_path / "run" / "sae" / "mixed4a")
    n = sae.cfg.n_latents
    base = ["visualize", run, "--layer", "mixed4a", "--steps", "1", "--size", "32",
            "--weights", "random", "--device", "cpu", "--no-progress"]
    cases = {
        ("--latents", str(n)): f"latent {n} is out of range for mixed4a: valid latents are "
                               f"0..{n - 1}",
        ("--latents", "1", "--branch", "7x7"): "mixed4a has no branch '7x7'; branches: 1x1, "
                                               "3x3, 5x5, pool",
        ("--latents", "1", "--objective", "beauty"): "unknown objective 'beauty'; choose one of",
        ("--channels", "512"): "channel 512 is out of range for mixed4a: valid channels are "
                               "0..511",
        ("--channels", "3", "--objective", "latent"): "--channels takes --objective channel or "
                                                      "neuron",
        ("--latents", "x,1"): "expected comma-separated integer ids, got 'x,1'",
    }
    for extra, msg in cases.items():
        r = runner.invoke(app, base + list(extra))
        assert r.exit_code == 2, (extra, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert any(ln.startswith("error: ") and msg in ln for ln in lines), (extra, r.output)
        assert not list((tmp_path / "run" / "viz" / "featurevis").rglob("*channel*"))
    # a dead latent, as the SAE's own counter says
    sae.since_fired[5] = 10**9
    sae.save(tmp_path / "run" / "sae" / "mixed4a")
    r = runner.invoke(app, base + ["--latents", "5"])
    assert r.exit_code == 2 and "latent 5 of mixed4a is dead" in r.output, r.output


def test_visualize_channels_of_the_network(e2e_run, tmp_path):
    run = _copy_run(e2e_run, tmp_path)
    r = runner.invoke(app, ["visualize", str(run), "--layer", "mixed4a", "--channels", "5,150",
                            "--steps", "2", "--size", "48", "--weights", "random",
                            "--device", "cpu", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["objective"] == "channel"
    idx = json.loads((run / "viz" / "featurevis" / "mixed4a" / "index_channel.json").read_text())
    assert [e["latent"] for e in idx["latents"]] == [5, 150]
    assert idx["render"]["redirect_relu_steps"] == 16
    for e in idx["latents"]:
        assert (run / "viz" / "featurevis" / "mixed4a" / e["file"]).is_file()


def test_global_options_work_after_the_command_too(tmp_path, monkeypatch):
    import logging

    from branchlens.cli import QUIET_ENV

    monkeypatch.setenv(QUIET_ENV, "0")  # restored after the test; every invocation resets it
    logger = logging.getLogger("branchlens")
    for args in (["-q", "presets", "demo", "--json"], ["presets", "demo", "--json", "-q"],
                 ["presets", "-q", "demo", "--json"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert logger.level == logging.WARNING and os.environ[QUIET_ENV] == "1", args
        assert json.loads(r.stdout)["demo"]["preset"] == "demo"
    r = runner.invoke(app, ["presets", "demo", "--json", "-v"])
    assert r.exit_code == 0 and logger.level == logging.DEBUG and os.environ.get(QUIET_ENV) != "1"
    r = runner.invoke(app, ["export-sae", str(tmp_path), "--layer", "-q"])  # a value: stays
    assert r.exit_code == 2 and "no trained SAE for -q" in r.stderr
    assert logger.level == logging.INFO
    r = runner.invoke(app, ["import-sae", str(tmp_path / "nothing"), str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
    r = runner.invoke(app, ["import-sae", str(tmp_path / "nothing"), str(tmp_path / "o"),
                            "--debug"])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)  # the traceback's error
    r = runner.invoke(app, ["import-sae", str(tmp_path / "nothing"), str(tmp_path / "o")])
    assert r.exit_code == 2  # --debug of the call before does not stick


def test_classify_json_is_json_lines_as_its_help_says():
    import re

    boxed = runner.invoke(app, ["classify", "--help"]).stdout
    help_text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", boxed).split())  # rich's frame, unwrapped
    assert "--json <bool> JSON Lines on stdout: one object per shown prediction (--show), then " \
           "one summary object" in help_text
    r = runner.invoke(app, ["classify", "embedded:3", "--weights", "random", "--workers", "0",
                            "--device", "cpu", "--show", "2", "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]  # every line is one JSON object
    assert len(lines) == 3 and all(set(p) == {"image_id", "label", "top5", "probs"}
                                   for p in lines[:2])
    assert lines[-1] == {"n": 3, "top1": None, "top5": None, "skipped": 0}
