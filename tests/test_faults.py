"""Fault injection (issue #11): no path may give a wrong result with exit code 0.

Each numbered section reproduces one item of the issue; the property-based tests (hypothesis)
check random ``--set`` values and random byte flips in artifacts; the last test kills
``branchlens run`` with SIGKILL and checks that resuming gives an uninterrupted run's artifacts.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from branchlens.artifacts import ArtifactError, load_tensors, read_json
from branchlens.cli import app
from branchlens.config import BLOCKS, ConfigError, block_fields
from branchlens.pipeline import _read_record, make_config, run, stage_hash
from branchlens.sae import SAEConfig, TopKSAE, load_meta
from branchlens.store import (
    ActivationStore,
    RunLock,
    ShardFile,
    StoreError,
    StoreLockedError,
    list_shards,
)
from branchlens.train import NonFiniteLossError, TrainConfig, train_sae

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")
QUIET = {"progress": False, "plot": False}
TINY: dict = {
    "harvest": {"layers": ["mixed4a"], "sampling": "uniform", "samples_per_image": 20,
                "batch_size": 4},
    "sae": {"expansion": 1, "k": 8},
    "train": {"batch_size": 32, "steps": 4, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2,
              "progress": False, "keep_optimizer": True},  # the checksum tests flip it
}
KW = dict(source="embedded:4", weights="random", device="cpu", stages=["harvest", "train"])
CASES = {"n": 0}  # hypothesis examples run in this module (printed at teardown)
# Examples per property test: small so the file runs in well under a minute; raise for a soak.
N_EXAMPLES = int(os.environ.get("BRANCHLENS_FAULT_EXAMPLES", "12"))


def _with(block: str, **kv) -> dict:
    return {**TINY, block: {**TINY.get(block, {}), **kv}}


def _weights(run_dir: Path, layer: str = "mixed4a") -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "sae" / layer / "weights.safetensors")[0]


def _cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    sys.stderr.write(f"\ntest_faults: {CASES['n']} hypothesis cases tried\n")


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """A finished tiny harvest + train run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("done") / "run"
    run(out, overrides=TINY, log=lambda m: None, **KW)
    return out


@pytest.fixture
def run_copy(done_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(done_run, dst)
    return dst


# -- 1. sae.* settings are part of the train hash -------------------------------------------------

def test_1_sae_settings_rerun_train_and_downstream():
    a = make_config("demo")
    b = make_config("demo", overrides={"sae": {"expansion": 8}})
    for stage in ("train", "analyze", "report"):
        assert stage_hash(a, stage, None) != stage_hash(b, stage, None)
    assert stage_hash(a, "harvest", None) == stage_hash(b, "harvest", None)


def test_1_sae_expansion_change_retrains(run_copy):
    logs: list[str] = []
    run(run_copy, overrides=_with("sae", expansion=2), log=logs.append, **KW)
    assert "[train] running" in logs
    assert _weights(run_copy)["W_enc"].shape[0] == 2 * 512
    assert any("discarded" in m for m in logs), logs


def test_1_deleted_sae_folder_is_not_up_to_date(run_copy):
    shutil.rmtree(run_copy / "sae")
    logs: list[str] = []
    run(run_copy, overrides=TINY, log=logs.append, **KW)
    assert "[train] running" in logs and (run_copy / "sae" / "mixed4a").is_dir()


def test_1_sae_k_zero_is_refused(tmp_path):
    r = _cli("run", "embedded:4", "--out", str(tmp_path / "r"), "--set", "sae.k=0")
    assert r.exit_code == 2 and "k" in r.output
    assert not (tmp_path / "r").exists()


# -- 2. a changed train.* value starts clean ------------------------------------------------------

def test_2_changed_lr_trains_from_scratch(run_copy, tmp_path):
    before = _weights(run_copy)
    logs: list[str] = []
    run(run_copy, overrides=_with("train", lr=0.01), log=logs.append, **KW)
    after = _weights(run_copy)
    assert not torch.equal(before["W_enc"], after["W_enc"])
    fresh = tmp_path / "fresh"
    run(fresh, overrides=_with("train", lr=0.01), log=lambda m: None, **KW)
    assert all(torch.equal(after[k], v) for k, v in _weights(fresh).items())
    assert load_meta(run_copy / "sae" / "mixed4a")["train"]["config"]["lr"] == 0.01
    assert read_json(run_copy / "run.json")["stages"]["train"]["settings"]["train"]["lr"] == 0.01


def test_2_force_retrains_rather_than_resuming(run_copy):
    logs: list[str] = []
    run(run_copy, overrides=TINY, log=logs.append, force=True, **KW)
    assert any("--force: discarded" in m for m in logs), logs


def test_2_changed_harvest_settings_reharvest_into_a_clean_store(run_copy):
    logs: list[str] = []
    run(run_copy, overrides=_with("harvest", samples_per_image=16), log=logs.append, **KW)
    assert any("harvest settings changed: discarded" in m for m in logs), logs
    assert ActivationStore.open(run_copy / "store").count("mixed4a") == 4 * 16


def _make_legacy(folder: Path) -> None:
    """Rewrite an SAE folder as an older branchlens left it: no resume key, no checksums."""
    from safetensors.torch import save_file

    for f in [folder / "weights.safetensors", *folder.glob("optim-step*.safetensors")]:
        tensors, meta = load_tensors(f)
        meta.get("cfg", {}).get("train", {}).pop("resume_key", None)
        save_file(tensors, str(f), metadata={k: json.dumps(v) for k, v in meta.items()})


def test_2_an_older_branchlens_sae_with_the_same_settings_is_kept(run_copy):
    from branchlens.train import train_layers

    folder = run_copy / "sae" / "mixed4a"
    _make_legacy(folder)
    before = _weights(run_copy)
    logs: list[str] = []
    tcfg = TrainConfig(**make_config("demo", overrides=TINY)["train"], seed=0)
    train_layers(run_copy, ["mixed4a"], {"k": 8}, tcfg, expansion=1, restart=True,
                 log=logs.append)
    assert any("older branchlens" in m for m in logs), logs
    assert all(torch.equal(before[k], v) for k, v in _weights(run_copy).items())
    _make_legacy(folder)
    tcfg.lr = 0.02
    train_layers(run_copy, ["mixed4a"], {"k": 8}, tcfg, expansion=1, restart=True,
                 log=logs.append)
    assert any("settings changed (train.lr)" in m for m in logs), logs


def test_2_cli_train_refuses_other_settings_without_restart(run_copy):
    args = ["train", str(run_copy), "--layers", "mixed4a", "--expansion", "1", "--k", "8",
            "--batch-size", "32", "--steps", "4", "--warmup-steps", "1", "--no-progress"]
    r = _cli(*args, "--lr", "0.02")
    assert r.exit_code == 2 and "other settings" in r.output and "--restart" in r.output
    r = _cli(*args, "--lr", "0.02", "--restart")
    assert r.exit_code == 0, r.output


# -- 3. checksummed checkpoints and SAE weights ---------------------------------------------------

def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_3_flipped_optimizer_checkpoint_is_detected_on_resume(run_copy):
    from branchlens.train import train_layers

    optim = next((run_copy / "sae" / "mixed4a").glob("optim-step*.safetensors"))
    _flip(optim, -3, 6)  # a high bit of the last float: an exponent bit
    tcfg = TrainConfig(**make_config("demo", overrides=TINY)["train"], seed=0)
    with pytest.raises(ArtifactError, match="sha256"):  # same settings: it would resume
        train_layers(run_copy, ["mixed4a"], {"k": 8}, tcfg, expansion=1)


def test_3_flipped_low_bit_in_weights_is_detected(run_copy):
    w = run_copy / "sae" / "mixed4a" / "weights.safetensors"
    _flip(w, -5, 0)
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        TopKSAE.load(w.parent)


# -- 4. non-finite or empty training is an error --------------------------------------------------

@pytest.mark.parametrize("bad", [{"lr": math.inf}, {"lr": 0.0}, {"steps": 0}, {"steps": -5},
                                 {"decay": "bogus"}, {"batch_size": 0}, {"ckpt_every": 0},
                                 {"log_every": 0}])
def test_4_train_config_refuses(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize("args", [["--lr", "inf"], ["--steps", "0"], ["--steps", "-5"],
                                  ["--decay", "bogus"], ["--batch-size", "0"],
                                  ["--ckpt-every", "0"], ["--log-every", "0"],
                                  ["--expansion", "0"]])
def test_4_cli_train_refuses(args, run_copy):
    r = _cli("train", str(run_copy), "--layers", "mixed4a", "--no-progress", *args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    if "--expansion" in args:
        assert "expansion" in r.output


def test_4_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    good = [torch.randn(32, 16, generator=gen) for _ in range(6)]
    bad = [*good[:2], torch.full((32, 16), float("nan")), *good[3:]]
    cfg = TrainConfig(batch_size=32, steps=6, ckpt_every=2, log_every=1, init_sample=32,
                      warmup_steps=0, **QUIET)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train_sae(lambda e: bad, SAEConfig(d_in=16, n_latents=32, k=4), cfg, tmp_path / "s")
    sae = TopKSAE.load(tmp_path / "s")
    assert load_meta(tmp_path / "s")["train"]["step"] == 2
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_4_warmup_longer_than_the_run_warns(tmp_path):
    x = torch.randn(64, 16)
    cfg = TrainConfig(batch_size=32, steps=2, warmup_steps=50, **QUIET)
    with pytest.warns(UserWarning, match="warmup"):
        train_sae(x, SAEConfig(d_in=16, n_latents=32, k=4), cfg, tmp_path / "s")


# -- 5. stages use the store's network ------------------------------------------------------------

def test_5_viz_stages_use_the_store_weights_or_refuse(run_copy, tmp_path):
    from branchlens.viz.stages import ProvenanceError, _model

    manifest = read_json(run_copy / "store" / "manifest.json")
    assert manifest["weights"]["source"] == "random"
    _, info = _model("bvlc_googlenet", None, "cpu", run_copy)
    assert info.source == "random"  # not the real BVLC weights by default
    fake = tmp_path / "w.safetensors"
    fake.write_bytes(b"x")
    with pytest.raises(ProvenanceError, match="RANDOM"):
        _model("bvlc_googlenet", str(fake), "cpu", run_copy)
    with pytest.raises(ProvenanceError, match="variant"):
        _model("inception5h", None, "cpu", run_copy)
    manifest["weights"] |= {"source": "file", "sha256": "0" * 64}
    (run_copy / "store" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProvenanceError, match="real weights"):
        _model("bvlc_googlenet", "random", "cpu", run_copy)


def test_5_an_sae_of_another_store_is_refused(run_copy):
    from types import SimpleNamespace

    from branchlens.viz.stages import ProvenanceError, check_sae_store, load_sae

    check_sae_store(run_copy, load_sae(run_copy, "mixed4a"))  # its own store: fine
    other = SimpleNamespace(meta={"store_hash": "0" * 64}, cfg=SimpleNamespace(layer="mixed4a"))
    with pytest.raises(ProvenanceError, match="another store"):
        check_sae_store(run_copy, other)


def test_5_real_weights_with_another_hash_are_refused(run_copy, bvlc_weights):
    from branchlens.viz.stages import ProvenanceError, _model

    mf = run_copy / "store" / "manifest.json"
    manifest = read_json(mf)
    manifest["weights"] |= {"source": "file", "sha256": "0" * 64}
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ProvenanceError, match="sha256"):
        _model("bvlc_googlenet", str(bvlc_weights), "cpu", run_copy)


# -- 6. typos are refused up front ----------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--stages", "harvset,trian"], ["harvset", "valid"]),
    (["--set", "bogusstage.x=1"], ["bogusstage", "valid"]),
    (["--set", "trian.steps=5"], ["trian", "valid"]),
    (["--set", "train.stepz=5"], ["stepz", "steps"]),
    (["--set", "train.steps=\"abc\""], ["train.steps", "int"]),
    (["--set", "train.lr=NaN"], ["non-finite"]),
    (["--set", "harvest.flip=3"], ["harvest.flip", "bool"]),
    (["--preset", "fast"], ["unknown preset"]),
])
def test_6_typos_and_wrong_types_are_refused_before_anything_runs(tmp_path, args, words):
    out = tmp_path / "r"
    r = _cli("run", "embedded:4", "--out", str(out), *args)
    assert r.exit_code == 2, r.output
    assert all(w in r.output for w in words), r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3
    assert not out.exists()


def test_6_schema_accepts_stages_and_flip():
    cfg = make_config("demo", overrides={"stages": ["harvest"], "harvest": {"flip": True}})
    assert cfg["harvest"]["flip"] is True
    for block in BLOCKS:
        assert block_fields(block)


def test_6_config_file_goes_through_the_schema(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"stepz": 3}}))
    r = _cli("run", "embedded:4", "--out", str(tmp_path / "r"), "--config", str(f))
    assert r.exit_code == 2 and "stepz" in r.output


# -- 7. one writer per run folder and per SAE folder ----------------------------------------------

def test_7_second_run_into_a_locked_folder_is_refused(run_copy):
    lock = RunLock(run_copy).acquire()
    try:
        with pytest.raises(StoreLockedError, match="run folder"):
            run(run_copy, overrides=TINY, log=lambda m: None, **KW)
        sae_lock = RunLock(run_copy / "sae", "SAE folder", ".mixed4a.lock").acquire()
        sae_lock.release()
    finally:
        lock.release()


def test_7_the_lock_dies_with_a_killed_holder(tmp_path):
    code = (f"import sys, time; sys.path.insert(0, {SRC!r})\n"
            "from branchlens.store import RunLock\n"
            f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError):
            RunLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = RunLock(tmp_path).acquire()
    assert lock.replaced_stale and lock.replaced_stale["pid"] == p.pid
    lock.release()


# -- 8. zero usable images ------------------------------------------------------------------------

@pytest.mark.parametrize("source_kind", ["empty", "limit0", "embedded0", "all_broken",
                                         "single_jpg"])
def test_8_no_usable_image_is_an_error(tmp_path, source_kind):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src, extra = str(folder), []
    if source_kind == "limit0":
        src, extra = "embedded:4", ["--limit", "0"]
    elif source_kind == "embedded0":
        src = "embedded:0"
    elif source_kind == "all_broken":
        for i in range(3):
            (folder / f"b{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    elif source_kind == "single_jpg":
        src = str(folder / "one.jpg")
        Path(src).write_bytes(b"\xff\xd8\xff\xe0 binary")
    r = _cli("harvest", src, "--out", str(tmp_path / "store"), "--layers", "mixed4a",
             "--weights", "random", "--device", "cpu", "--workers", "0", "--no-progress", *extra)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert any(w in r.output for w in ("no images", "no usable image", "single image",
                                       "--limit")), r.output
    if source_kind == "all_broken":  # train afterwards: the same clear reason, not "re-run"
        shutil.copytree(tmp_path / "store", tmp_path / "run" / "store")
        r = _cli("train", str(tmp_path / "run"), "--layers", "mixed4a", "--no-progress")
        assert r.exit_code == 2 and "no usable image" in r.output, r.output


def test_8_classify_on_an_empty_folder_fails(tmp_path):
    r = _cli("classify", str(tmp_path), "--weights", "random", "--workers", "0")
    assert r.exit_code == 2 and "no image" in r.output


# -- 9. samples per image are capped at the grid ---------------------------------------------------

def test_9_samples_per_image_above_the_grid_are_capped(tmp_path):
    from branchlens.harvest import harvest

    with pytest.warns(UserWarning, match="capped at 196"):
        harvest("embedded:2", tmp_path / "s", ["mixed4a"], weights="random", device="cpu",
                sampling="norm", samples_per_image=500, workers=0, show_progress=False)
    store = ActivationStore.open(tmp_path / "s")
    assert store.count("mixed4a") == 2 * 196


# -- lesser items ---------------------------------------------------------------------------------

def test_errors_are_one_line_and_debug_shows_the_trace(tmp_path):
    r = _cli("run", "--out", str(tmp_path / "r"), "--preset", "bogus")
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = _cli("--debug", "run", "--out", str(tmp_path / "r"), "--preset", "bogus")
    assert isinstance(r.exception, ConfigError)
    os.environ.pop("BRANCHLENS_DEBUG", None)


def test_truncated_run_json_and_shard_name_the_file(run_copy):
    rec = run_copy / "run.json"
    rec.write_text(rec.read_text()[:40])
    with pytest.raises(ArtifactError, match="run.json"):
        run(run_copy, overrides=TINY, log=lambda m: None, **KW)
    shard = list_shards(run_copy / "store")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match=shard.name):
        sh = ShardFile(shard)
        for name in sh.tensors:
            sh.get(name)


@pytest.mark.parametrize("opt", [["--batch-size", "0"], ["--shard-size", "0"],
                                 ["--limit", "0"]])
def test_harvest_zero_sizes_are_refused(tmp_path, opt):
    r = _cli("harvest", "embedded:2", "--out", str(tmp_path / "s"), "--weights", "random",
             *opt)
    assert r.exit_code == 2 and opt[0] in r.output


@pytest.mark.parametrize("args", [
    ["visualize", "RUN", "--layer", "mixed4a", "--steps", "0"],
    ["examples", "RUN", "--layer", "mixed4a", "--limit", "0"],
    ["circuits", "RUN", "--up", "mixed4a", "--down", "mixed4b", "--n-images", "0"],
    ["analyze", "RUN", "--n-perm", "0"],
    ["report", "RUN", "--cards-per-layer", "0"],
])
def test_stage_commands_refuse_zero_counts(run_copy, args):
    r = _cli(*[str(run_copy) if a == "RUN" else a for a in args])
    assert r.exit_code == 2 and "must be >= 1" in r.output, r.output


def test_artifacts_follow_the_umask(tmp_path):
    from branchlens.artifacts import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# -- property-based: configs ----------------------------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 5000),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["none", "linear", "fvu", "tied", "norm", "all", "abc", ""]),
                    st.lists(st.sampled_from(["mixed4a", "mixed4b", "zzz"]), max_size=3))
_KEYS = st.sampled_from([(b, k) for b in BLOCKS for k in block_fields(b)]
                        + [("train", "stepz"), ("trian", "steps"), ("sae", "expansionn")])


@settings(max_examples=N_EXAMPLES * 4, deadline=None)
@given(key=_KEYS, value=_VALUES)
def test_property_set_values_are_refused_or_change_the_hash(key, value):
    """An accepted ``--set`` always reaches the config and the hash of the stage using it
    (unless it changes no artifact: then never); a value the schema accepts is also accepted by
    the stage's own dataclass (no late error)."""
    from branchlens.config import NON_ARTIFACT

    CASES["n"] += 1
    block, name = key
    base = make_config("demo")
    try:
        cfg = make_config("demo", overrides={block: {name: value}})
    except ConfigError:
        return
    assert cfg[block][name] == value
    stage = "train" if block == "sae" else block
    if base.get(block, {}).get(name, object()) != value:
        same = stage_hash(base, stage, None) == stage_hash(cfg, stage, None)
        assert same == (name in NON_ARTIFACT.get(block, ()))
    if block == "train":
        TrainConfig(**cfg["train"])


@settings(max_examples=N_EXAMPLES, deadline=None)
@given(item=st.text(st.sampled_from("abcehinrstv.=0123456789_\"-"), max_size=20))
def test_property_random_set_strings_never_traceback(item):
    """Garbage ``--set`` strings are refused with rc 2 (or accepted only as valid settings)."""
    CASES["n"] += 1
    from branchlens.config import parse_set

    try:
        block, name, value = parse_set(item)
        make_config("demo", overrides={block: {name: value}})
    except ConfigError:
        pass


_TRAIN_OPTS = {  # option -> whether a (numeric) value is in range
    "--lr": lambda v: math.isfinite(v) and v > 0, "--steps": lambda v: v >= 1,
    "--batch-size": lambda v: v >= 1, "--ckpt-every": lambda v: v >= 1,
    "--log-every": lambda v: v >= 1, "--warmup-steps": lambda v: v >= 0,
    "--epochs": lambda v: math.isfinite(v) and v > 0, "--expansion": lambda v: v >= 1,
    "--k": lambda v: v >= 1, "--heldout-fraction": lambda v: 0 <= v < 1,
}
_CLI_VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([math.inf, -math.inf, math.nan, 0.5]),
                        st.just("abc"))


@settings(max_examples=N_EXAMPLES * 2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opt=st.sampled_from(sorted(_TRAIN_OPTS)), value=_CLI_VALUES)
def test_property_cli_train_values_are_refused_before_any_data_is_read(tmp_path, opt, value):
    """Any value: exit code 2 and one message, never a traceback; an out-of-range value is
    refused for itself, before the (missing) store is even opened."""
    CASES["n"] += 1
    r = _cli("train", str(tmp_path / "no-run"), "--layers", "mixed4a", "--no-progress", opt,
             str(value))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    if not isinstance(value, str) and not _TRAIN_OPTS[opt](value):
        assert "activation store" not in r.output, r.output


_RUN_SETS = st.sampled_from([
    ("train", "lr", 1e-4), ("train", "lr", 5e-3), ("train", "steps", 3), ("train", "steps", 0),
    ("train", "decay", "cosine"), ("train", "decay", "bogus"), ("train", "stepz", 2),
    ("sae", "k", 4), ("sae", "k", 0), ("sae", "expansion", 2), ("sae", "decoder", "tied"),
    ("sae", "loss", "paper"), ("sae", "aux", False), ("trian", "steps", 2)])


@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setting=_RUN_SETS)
def test_property_run_set_reaches_the_artifact_or_fails(done_run, tmp_path, setting):
    """End to end: ``branchlens run --set`` either exits 2 (one line) or the trained SAE on
    disk was made with exactly that value."""
    CASES["n"] += 1
    block, key, value = setting
    out = tmp_path / f"r{CASES['n']}"
    shutil.copytree(done_run, out)
    r = _cli("run", "embedded:4", "--out", str(out), "--weights", "random", "--device", "cpu",
             "--stages", "harvest,train", *_sets(TINY), "--set",
             f"{block}.{key}={json.dumps(value)}")
    if r.exit_code != 0:
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        return
    meta = load_meta(out / "sae" / "mixed4a")
    if block == "train":
        assert meta["train"]["config"][key] == value
    elif key == "expansion":
        assert meta["sae"]["n_latents"] == value * meta["sae"]["d_in"]
    else:
        assert meta["sae"][key] == value


# -- property-based: corrupted artifacts ----------------------------------------------------------

_FLIPS = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=3)
_SLOW_OK = settings(max_examples=N_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _flipped(src: Path, dst: Path, flips) -> Path:
    data = bytearray(src.read_bytes())
    for off, bit in flips:
        data[off % len(data)] ^= 1 << bit
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


@_SLOW_OK
@given(flips=_FLIPS)
def test_property_flipped_sae_weights_are_detected_or_harmless(done_run, tmp_path, flips):
    CASES["n"] += 1
    folder = done_run / "sae" / "mixed4a"
    dst = tmp_path / f"w{CASES['n']}"
    _flipped(folder / "weights.safetensors", dst / "weights.safetensors", flips)
    try:
        sae = TopKSAE.load(dst)
    except ArtifactError:
        return
    ref = TopKSAE.load(folder)
    assert sae.cfg == ref.cfg
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(),
                                                 ref.state_dict().values(), strict=True))


@_SLOW_OK
@given(flips=_FLIPS)
def test_property_flipped_checkpoints_are_detected_or_harmless(done_run, tmp_path, flips):
    CASES["n"] += 1
    optim = next((done_run / "sae" / "mixed4a").glob("optim-step*.safetensors"))
    dst = _flipped(optim, tmp_path / f"o{CASES['n']}" / optim.name, flips)
    try:
        got, meta = load_tensors(dst, require_checksum=True)
    except ArtifactError:
        return
    ref, ref_meta = load_tensors(optim)
    assert meta == ref_meta and all(torch.equal(got[k], v) for k, v in ref.items())


@_SLOW_OK
@given(flips=_FLIPS)
def test_property_flipped_shards_are_detected_or_harmless(done_run, tmp_path, flips):
    CASES["n"] += 1
    shard = list_shards(done_run / "store")[0]
    dst = _flipped(shard, tmp_path / f"s{CASES['n']}" / shard.name, flips)
    try:
        sh = ShardFile(dst)
        got = {k: np.array(sh.get(k)) for k in sh.tensors}
        sh.check_file()
    except StoreError:
        return
    ref = ShardFile(shard)
    assert all(np.array_equal(got[k], np.array(ref.get(k)), equal_nan=True) for k in ref.tensors)


@_SLOW_OK
@given(flips=_FLIPS)
def test_property_flipped_run_record_never_skips_a_stage_wrongly(done_run, tmp_path, flips):
    """A corrupt run.json is refused (naming it) or at worst makes stages run again."""
    CASES["n"] += 1
    dst = _flipped(done_run / "run.json", tmp_path / f"r{CASES['n']}" / "run.json", flips)
    try:
        rec = _read_record(dst)
    except ArtifactError as e:
        assert "run.json" in str(e)
        return
    ref = read_json(done_run / "run.json")
    for stage, prev in rec["stages"].items():
        if isinstance(prev, dict) and prev.get("status") == "done":
            same = ref["stages"].get(stage, {})
            if prev.get("config_hash") == same.get("config_hash"):
                assert same.get("status") == "done"


# -- kill -9 at random points, then resume --------------------------------------------------------

def _sets(cfg: dict) -> list[str]:
    return [a for b, kv in cfg.items() if isinstance(kv, dict) for k, v in kv.items()
            for a in ("--set", f"{b}.{k}={json.dumps(v)}")]


KILL_CFG = {**TINY, "harvest": {**TINY["harvest"], "shard_size": 1},
            "train": {**TINY["train"], "steps": 40, "ckpt_every": 5, "log_every": 5},
            "analyze": {"n_perm": 20, "curve_reps": 10, "embed": "none"},
            "report": {"cards_per_layer": 2}}
KILL_STAGES = "harvest,train,analyze,report"
N_KILLS = 3  # stages (drawn at random) in which a run is killed, each at a random moment


def _assert_same_artifacts(out: Path, ref: Path) -> None:
    """Resumed run == uninterrupted run: same stored vectors and SAE (to float noise: a resumed
    harvest batches images differently, and conv kernels round by batch), same latent table."""
    a, b = ActivationStore.open(out / "store"), ActivationStore.open(ref / "store")
    for layer in b.layers:
        np.testing.assert_array_equal(np.asarray(a.provenance(layer)),
                                      np.asarray(b.provenance(layer)))
        np.testing.assert_allclose(np.asarray(a.array(layer)[:], np.float32),
                                   np.asarray(b.array(layer)[:], np.float32),
                                   rtol=1e-3, atol=1e-3)
    wa, wb = _weights(out), _weights(ref)
    assert wa.keys() == wb.keys()
    for k in (k for k in wb if wb[k].is_floating_point() and k != "since_fired"):
        # training amplifies the harvest's float noise a little (the dead-latent counters too)
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-2)
        assert ((wa[k] - wb[k]).abs() > 1e-3).float().mean() < 0.01, k
    rows = [list(csv.DictReader(open(r / "analysis" / "latents.csv"))) for r in (out, ref)]
    assert len(rows[0]) == len(rows[1]) and rows[0][0].keys() == rows[1][0].keys()
    same = np.mean([x["dominant"] == y["dominant"] for x, y in zip(*rows, strict=True)])
    assert same >= 0.95, same


def _wait_running(p: subprocess.Popen, record: Path, stage: str, timeout: float) -> bool:
    """Wait until ``run.json`` says ``stage`` is running (False if the process ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if read_json(record)["stages"].get(stage, {}).get("status") == "running":
                return True
        except (FileNotFoundError, ArtifactError, KeyError):
            pass
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    run(ref, overrides=KILL_CFG, source="embedded:4", weights="random", device="cpu",
        stages=KILL_STAGES.split(","), log=lambda m: None)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "branchlens", "run", "embedded:4", "--out", str(out),
           "--weights", "random", "--device", "cpu", "--stages", KILL_STAGES, *_sets(KILL_CFG)]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(int(os.environ.get("BRANCHLENS_KILL_SEED", time.time_ns() % 997)))
    order = KILL_STAGES.split(",")
    targets = sorted(rng.choice(order, N_KILLS, replace=False).tolist(), key=order.index)
    killed = []
    for stage in targets:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _wait_running(p, out / "run.json", stage, timeout=60):
            time.sleep(float(rng.uniform(0.0, 0.5)))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed.append(stage)
        p.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sys.stderr.write(f"\nkill -9 landed in {killed} (targets {targets})\n")
    assert killed, f"no kill landed (targets {targets})"
    _assert_same_artifacts(out, ref)
    assert (out / "report" / "index.html").is_file()


def test_5_examples_reopen_the_store_source_with_flips_or_refuse_another(tmp_path, run_copy):
    from branchlens.harvest import harvest
    from branchlens.viz.stages import ProvenanceError, run_source

    flipped = tmp_path / "flip"
    harvest("embedded:2", flipped / "store", ["mixed4a"], weights="random", device="cpu",
            sampling="uniform", samples_per_image=2, workers=0, flip=True, show_progress=False)
    src, n = run_source(flipped)
    assert n == 4 and len(src) == 4 and src.description.endswith("+flip")
    with pytest.raises(ProvenanceError, match="not the source"):
        run_source(run_copy, "embedded:3")
    assert run_source(run_copy, "embedded:4")[1] == 4
