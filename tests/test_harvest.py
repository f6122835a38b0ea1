"""Harvest: sampling distributions, provenance, kill/resume, torchrun ranks, skips, options."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from branchlens import store as st
from branchlens.data import decode_image, open_source, preprocess
from branchlens.harvest import (
    FP16_OVERFLOW,
    NON_FINITE,
    sample_batch,
    sampling_groups,
)
from branchlens.model import InceptionV1
from branchlens.stages.harvest import harvest
from branchlens.store import (
    ActivationStore,
    StoreConfigMismatch,
    StoreError,
    StoreLock,
    StoreLockedError,
)
from branchlens.weights import load_model

SHARED = Path(__file__).parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "bvlc_googlenet.safetensors"
SHARED_IMAGES = SHARED / "data" / "imagenet-sample"
BIN = Path(sys.executable).parent
FAST = dict(show_progress=False, workers=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards on a shared 2-core box: OpenMP spin-waiting under load costs 5x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def random_model():
    with pytest.warns(UserWarning, match="RANDOM"):
        return load_model("bvlc_googlenet", "random", seed=0)[0]


def records(path) -> dict:
    """{(layer, image, sample): (y, x, vector)} of a finished store."""
    s = ActivationStore.open(path, verify="full")
    out = {}
    for layer in s.layers:
        vec, prov = np.asarray(s.array(layer, np.float32)), s.provenance(layer)
        for v, (i, y, x, k) in zip(vec, prov, strict=True):
            key = (layer, int(i), int(k))
            assert key not in out, f"duplicate record {key}"
            out[key] = (int(y), int(x), v)
    return out


def assert_same_records(a: dict, b: dict, rtol=1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:2] == b[k][:2], k
        np.testing.assert_allclose(a[k][2], b[k][2], rtol=rtol, atol=rtol * 10)


# -- sampling -----------------------------------------------------------------------------------

def _planted(n_images=300):
    """Channel vectors whose L2 norm at grid position p (4x4) is p + 1, spread over channels."""
    norms = torch.arange(1, 17, dtype=torch.float32).view(4, 4)
    dirs = torch.nn.functional.normalize(torch.rand(n_images, 3, 4, 4) + 0.1, dim=1)
    return {"L": dirs * norms}, {"L": (3, 4, 4)}, np.arange(1, 17, dtype=np.float64)


def _freq(pos: np.ndarray) -> np.ndarray:
    return np.bincount(pos.ravel(), minlength=16)


def test_norm_sampling_frequency_is_proportional_to_norm():
    acts, shapes, norms = _planted()
    _, provs, bad = sample_batch(acts, list(range(300)), [("L", ["L"])], shapes, "norm", 20, 0,
                                 torch.float32)
    assert not any(bad)
    flat = provs["L"][:, :, 1] * 4 + provs["L"][:, :, 2]
    f = _freq(flat)
    assert chisquare(f, f.sum() * norms / norms.sum()).pvalue > 1e-3
    # The test has power: frequencies are not uniform and not proportional to norm squared.
    assert chisquare(f, np.full(16, f.sum() / 16)).pvalue < 1e-6
    assert chisquare(f, f.sum() * norms ** 2 / (norms ** 2).sum()).pvalue < 1e-6
    assert (np.diff(np.sort(flat, 1), axis=1) == 0).any()  # drawn with replacement


def test_uniform_and_all_sampling():
    acts, shapes, norms = _planted()
    _, provs, _ = sample_batch(acts, list(range(300)), [("L", ["L"])], shapes, "uniform", 5, 0,
                               torch.float32)
    flat = provs["L"][:, :, 1] * 4 + provs["L"][:, :, 2]
    assert all(len(set(r)) == 5 for r in flat)  # without replacement
    f = _freq(flat)
    assert chisquare(f).pvalue > 1e-3
    assert chisquare(f, f.sum() * norms / norms.sum()).pvalue < 1e-6
    two = {"L": acts["L"][:2]}
    vecs, provs, _ = sample_batch(two, [7, 8], [("L", ["L"])], shapes, "all", 0, 0,
                                  torch.float32)
    assert vecs["L"].shape == (2, 16, 3)
    np.testing.assert_array_equal(provs["L"][1, :, 1:], [[p // 4, p % 4, p] for p in range(16)])
    np.testing.assert_allclose(vecs["L"][1, 5], acts["L"][1, :, 1, 1].numpy())


def test_sampling_is_independent_of_batch_and_aligned_layers_share_positions():
    acts, shapes, _ = _planted(3)
    acts["M"] = torch.rand(3, 5, 4, 4)
    shapes["M"] = (5, 4, 4)

    def positions(a, idx, aligned):
        groups = sampling_groups(["L", "M"], shapes, aligned)
        _, provs, _ = sample_batch(a, idx, groups, shapes, "norm", 10, 0, torch.float32)
        return {k: p[:, :, 1:3] for k, p in provs.items()}

    full = positions(acts, [5, 6, 7], False)
    alone = positions({k: v[2:] for k, v in acts.items()}, [7], False)
    np.testing.assert_array_equal(full["L"][2], alone["L"][0])
    assert not np.array_equal(full["L"], full["M"])
    al = positions(acts, [5, 6, 7], True)
    np.testing.assert_array_equal(al["L"], al["M"])
    assert sampling_groups(["L", "M"], shapes, True) == [("grid4x4", ["L", "M"])]


# -- provenance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["shared", "random"])
def test_stored_vectors_equal_recomputed_activations(tmp_path, weights, random_model):
    if weights == "shared":
        if not (SHARED_WEIGHTS.is_file() and SHARED_IMAGES.is_dir()):
            pytest.skip(f"real weights/images not found under {SHARED}")
        model, source = load_model("bvlc_googlenet", SHARED_WEIGHTS)[0], str(SHARED_IMAGES)
    else:
        model, source = random_model, "embedded:3"
    layers = ["mixed4a", "mixed4d", "mixed4d_1x1"]
    harvest(source, tmp_path / "s", layers, model=model, dtype="fp32", aligned=True, limit=3,
            batch_size=2, **FAST)
    s = ActivationStore.open(tmp_path / "s")
    assert s.manifest["widths"]["mixed4d"]["branches"]["1x1"] == [0, 112]
    src = open_source(source, "bvlc_googlenet")
    for i in range(3):
        x = preprocess(decode_image(src[i].payload), "bvlc_googlenet")[None]
        with torch.inference_mode():
            ref = model(x, layers)
        assert s.images[i]["id"] == src[i].image_id
        for layer in layers:
            vec, prov = s.image(i, layer)
            assert len(vec) == 10 and (prov[:, 0] == i).all()
            want = ref[layer][0][:, prov[:, 1], prov[:, 2]].T.numpy()
            np.testing.assert_allclose(vec, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        # aligned: the 1x1 branch layer is the 1x1 slice of the block at the same positions
        np.testing.assert_array_equal(s.image(i, "mixed4d")[1], s.image(i, "mixed4d_1x1")[1])
        np.testing.assert_allclose(s.image(i, "mixed4d")[0][:, :112],
                                   s.image(i, "mixed4d_1x1")[0], rtol=1e-5, atol=1e-5)


# -- resume, ranks ------------------------------------------------------------------------------

def _cli_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_kill_minus_9_then_resume_gives_exact_records(tmp_path):
    out = tmp_path / "s"
    args = ["embedded:16", "--layers", "mixed3b,mixed4a", "--out", str(out), "--weights",
            "random", "--batch-size", "1", "--shard-size", "1", "--workers", "0",
            "--dtype", "fp32", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "branchlens", "harvest", *args],
                            env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not st.list_shards(out):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no shard appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "finished before the kill; test needs more work"
    n_before = len(st.list_shards(out))
    done = st.done_images(out)
    assert 0 < len(done) < 16
    with pytest.raises(st.StoreIncompleteError):
        ActivationStore.open(out)
    res = harvest("embedded:16", out, "mixed3b,mixed4a", weights="random", batch_size=3,
                  shard_size=2, dtype="fp32", **FAST)
    assert res.resumed_images == len(done) and res.images == 16 - len(done)
    assert len(st.list_shards(out)) > n_before
    got = records(out)
    assert len(got) == 2 * 16 * 10  # one record per (image, layer, sample): no gap, no dup
    ref = tmp_path / "ref"
    harvest("embedded:16", ref, "mixed3b,mixed4a", weights="random", batch_size=8,
            shard_size=100, dtype="fp32", **FAST)
    assert_same_records(got, records(ref))
    again = harvest("embedded:16", out, "mixed3b,mixed4a", weights="random", dtype="fp32",
                    **FAST)  # a finished store: nothing to do
    assert again.images == 0 and again.manifest["counts"]["vectors"]["mixed4a"] == 160


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    out = tmp_path / "s2"
    common = ["--layers", "mixed3a,mixed3b_5x5", "--weights", "random", "--batch-size", "3",
              "--shard-size", "2", "--workers", "0", "--dtype", "fp32", "--sampling",
              "uniform", "--samples-per-image", "6"]
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
                        "branchlens", "harvest", "embedded:8", "--out", str(out),
                        "--no-progress", *common], env=_cli_env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stdout
    m = ActivationStore.open(out).manifest
    assert m["harvest"]["world_size"] == 2 and {s["rank"] for s in m["shards"]} == {0, 1}
    harvest("embedded:8", tmp_path / "s1", "mixed3a,mixed3b_5x5", weights="random",
            batch_size=8, dtype="fp32", sampling="uniform", samples_per_image=6, **FAST)
    assert_same_records(records(out), records(tmp_path / "s1"))


# -- skips, options, errors ---------------------------------------------------------------------

class _Poisoned(InceptionV1):
    """Batch 1: image 1 gets a NaN; batch 2: image 0 (image 2) overflows fp16."""

    calls = 0

    def forward(self, x, layers=None):
        out = super().forward(x, layers)
        if x.shape[0] != 2:  # the one-image shape probe and the last, short batch
            return out
        type(self).calls += 1
        if type(self).calls == 1:
            out[layers[0]][1, 0, 0, 0] = float("nan")
        if type(self).calls == 2:
            out[layers[-1]][0] *= 1e6
        return out


def test_non_finite_activations_and_bad_files_are_skipped_and_counted(tmp_path, random_model):
    model = _Poisoned(random_model.variant)
    model.load_state_dict(random_model.state_dict())
    harvest("embedded:5", tmp_path / "p", "mixed3a,mixed3b", model=model, batch_size=2,
            **FAST)
    s = ActivationStore.open(tmp_path / "p")
    assert s.manifest["skips"]["counts"] == {NON_FINITE: 1, FP16_OVERFLOW: 1}
    assert s.images[1]["skipped"] == NON_FINITE and s.images[2]["skipped"] == FP16_OVERFLOW
    assert s.count("mixed3a") == 3 * 10
    assert sorted(set(s.provenance("mixed3b")[:, 0])) == [0, 3, 4]
    assert np.isfinite(np.asarray(s.array("mixed3b"))).all()

    import skimage

    folder = tmp_path / "imgs"
    folder.mkdir()
    data = Path(skimage.__file__).parent / "data"
    shutil.copy(data / "chelsea.png", folder / "a.png")
    (folder / "b.jpg").write_bytes(b"this is not a jpeg")
    (folder / "c.png").write_bytes(b"")
    shutil.copy(data / "coffee.png", folder / "d.png")
    res = harvest(str(folder), tmp_path / "f", "mixed3a", model=random_model, batch_size=3,
                  **FAST)
    m = ActivationStore.open(tmp_path / "f").manifest
    assert m["skips"]["counts"] == {"not_image": 1, "empty": 1}
    assert m["counts"]["images"] == 4 and m["counts"]["images_skipped"] == 2
    assert res.skips.total == 2
    assert ActivationStore.open(tmp_path / "f").images[2] == {"id": "imgs/c.png", "label": None,
                                                              "skipped": "empty"}
    assert sorted(set(ActivationStore.open(tmp_path / "f").provenance("mixed3a")[:, 0])) == [0, 3]


def test_fp16_option(tmp_path, random_model):
    for dt in ("fp16", "fp32"):
        harvest("embedded:3", tmp_path / dt, "mixed3b", model=random_model, dtype=dt, **FAST)
    a, b = (ActivationStore.open(tmp_path / dt) for dt in ("fp16", "fp32"))
    assert a.manifest["dtype"] == "fp16" and a.array("mixed3b").dtype == np.float16
    assert b.array("mixed3b").dtype == np.float32
    np.testing.assert_array_equal(a.provenance("mixed3b"), b.provenance("mixed3b"))
    x16, x32 = np.asarray(a.array("mixed3b"), np.float32), np.asarray(b.array("mixed3b"))
    np.testing.assert_allclose(x16, x32, rtol=2e-3, atol=2e-3 * np.abs(x32).max())
    assert next(a.iter_batches("mixed3b", 4)).dtype == torch.float32
    size = {dt: sum(p.stat().st_size for p in st.list_shards(tmp_path / dt))
            for dt in ("fp16", "fp32")}
    assert size["fp16"] < 0.6 * size["fp32"]


def test_collect_is_the_library_under_the_stage(tmp_path, random_model, monkeypatch):
    """The stage opens the source and places the network; ``collect``, handed both, writes the
    same store. The old name ``branchlens.harvest.harvest`` is the stage (kept one release)."""
    from branchlens.threads import ENV

    # bit-equal stores need equal thread counts (the stage would choose its own, and a conv on
    # another count of threads may round one value differently)
    monkeypatch.setenv(ENV, str(torch.get_num_threads()))
    import branchlens
    import branchlens.harvest as library
    from branchlens.distributed import Dist

    assert library.harvest is harvest and branchlens.harvest_activations is harvest
    kw = dict(sampling="uniform", samples_per_image=3, batch_size=2, **FAST)
    harvest("embedded:4", tmp_path / "stage", "mixed3a,mixed3b", model=random_model, **kw)
    comm = Dist()
    try:
        res = library.collect(random_model.eval(), open_source("embedded:4", "bvlc_googlenet"),
                              tmp_path / "lib", ["mixed3a", "mixed3b"], comm=comm,
                              weights={"variant": "bvlc_googlenet", "source": "in-memory",
                                       "path": None, "sha256": None, "seed": None,
                                       "random": False},
                              device=torch.device("cpu"), **kw)
    finally:
        comm.close()
    assert res.manifest["counts"]["images"] == 4
    assert_same_records(records(tmp_path / "stage"), records(tmp_path / "lib"), rtol=0)
    with pytest.raises(ValueError, match="--sampling must be one of"):  # the library checks too
        library.collect(random_model, None, tmp_path / "x", ["mixed3a"], comm=comm, weights={},
                        device=torch.device("cpu"), sampling="best")


def test_lock_and_config_mismatch_refused(tmp_path, random_model):
    out = tmp_path / "s"
    harvest("embedded:2", out, "mixed3a", model=random_model, **FAST)
    lock = StoreLock(out).acquire()
    try:
        with pytest.raises(StoreLockedError, match="another process"):
            harvest("embedded:2", out, "mixed3a", model=random_model, **FAST)
    finally:
        lock.release()
    with pytest.raises(StoreConfigMismatch, match="samples_per_image"):
        harvest("embedded:2", out, "mixed3a", model=random_model, samples_per_image=5, **FAST)
    with pytest.raises(StoreConfigMismatch, match="layers"):
        harvest("embedded:2", out, "mixed3a,mixed3b", model=random_model, **FAST)


def test_disk_full_during_harvest_then_resume(tmp_path, random_model, monkeypatch):
    real, calls = st.shard._write_bytes, []

    def full_disk(f, data):
        calls.append(1)
        if len(calls) > 7:  # one shard = header + 6 tensors of one layer
            raise OSError(28, "No space left on device")
        real(f, data)

    monkeypatch.setattr(st.shard, "_write_bytes", full_disk)
    out = tmp_path / "s"
    with pytest.raises(StoreError, match="disk is full"):
        harvest("embedded:6", out, "mixed3a", model=random_model, shard_size=2, batch_size=2,
                **FAST)
    assert len(st.list_shards(out)) == 1 and not (out / "manifest.json").exists()
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(st.shard, "_write_bytes", real)
    res = harvest("embedded:6", out, "mixed3a", model=random_model, shard_size=2, batch_size=2,
                  **FAST)
    assert res.resumed_images == 2
    assert len(records(out)) == 6 * 10


def test_cli_unwritable_destination_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from branchlens.cli import app

    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(app, ["harvest", "embedded:2", "--layers", "mixed3a", "--out",
                                 str(tmp_path / "file" / "store"), "--weights", "random",
                                 "--workers", "0", "--no-progress"])
    assert r.exit_code == 2
    assert "not a directory" in r.output and "re-run" in r.output
