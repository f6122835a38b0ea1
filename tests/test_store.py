"""Activation store: shard format, checksums, lock, config checks, stats and the reader."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from branchlens import store as st
from branchlens.store import (
    ActivationStore,
    CorruptShardError,
    ShardWriter,
    StoreConfigMismatch,
    StoreError,
    StoreIncompleteError,
    StoreLock,
    StoreLockedError,
)

LAYERS = ["a", "b"]
DIMS = {"a": 6, "b": 3}


def _config(**kw):
    cfg = {"variant": "test", "layers": LAYERS,
           "widths": {k: {"channels": d, "grid": [4, 4], "branches": None}
                      for k, d in DIMS.items()},
           "sampling": {"method": "norm", "samples_per_image": 3, "aligned": False, "seed": 0},
           "dtype": "fp32", "source": {"description": "synthetic", "n_images": 20},
           "weights": {"source": "none"}}
    cfg.update(kw)
    return cfg


def _vectors(i: int, layer: str, n: int = 3) -> np.ndarray:
    """Deterministic, distinct vectors; column 0 encodes (image, sample) for identity checks."""
    rng = np.random.default_rng([i, len(layer)])
    x = rng.gamma(2.0, 1.0, (n, DIMS[layer])).astype(np.float32)
    x[:, 0] = i * 10 + np.arange(n)
    return x


def make_store(path, n_images=20, shard_size=4, skip=(), dtype="fp32"):
    cfg = _config(dtype=dtype)
    cfg["source"]["n_images"] = n_images
    lock = StoreLock(path).acquire()
    try:  # the same steps as a harvest: resumes whatever images are not yet in shards
        st.prepare_store(path, cfg)
        done = st.done_images(path)
        w = ShardWriter(path, 0, LAYERS, DIMS, dtype, shard_size, seq=st.next_seq(path, 0))
        for i in range(n_images):
            if i in done:
                continue
            if i in skip:
                w.skip(i, f"img{i}", "not_image")
                continue
            vecs = {k: _vectors(i, k).astype(st.STORAGE_DTYPES[dtype]) for k in LAYERS}
            prov = {k: np.array([[i, s, s + 1, s] for s in range(3)]) for k in LAYERS}
            w.add(i, f"img{i}", i % 5, vecs, prov)
        w.flush()
        st.finalize_store(path, n_images, {})
    finally:
        lock.release()
    return ActivationStore.open(path)


def test_shards_are_standard_safetensors_and_round_trip(tmp_path):
    s = make_store(tmp_path / "s", skip={3})
    assert s.layers == LAYERS and s.dim("a") == 6 and s.count("a") == 19 * 3
    shard = st.list_shards(tmp_path / "s")[0]
    assert set(load_file(str(shard))) >= {"a", "a.prov", "b", "b.sum"}  # readable by safetensors
    a = np.asarray(s.array("a"))
    prov = s.provenance("a")
    assert prov.dtype == np.int64 and prov.shape == (57, 4)
    for row, p in zip(a, prov, strict=True):
        np.testing.assert_array_equal(row, _vectors(int(p[0]), "a")[p[3]])
    vec, p = s.image(7, "b")
    np.testing.assert_array_equal(vec, _vectors(7, "b"))
    assert s.image(3, "a")[0].shape == (0, 6)
    assert s.images[3]["skipped"] == "not_image" and s.images[4] == {"id": "img4", "label": 4,
                                                                     "shard": 1}
    assert s.manifest["counts"]["images_skipped"] == 1
    assert s.manifest["skips"]["counts"] == {"not_image": 1}
    assert all(len(r["sha256"]) == 64 for r in s.manifest["shards"])
    arr = s.array("a", dtype=np.float32)
    np.testing.assert_array_equal(arr[[5, 0, 56]], a[[5, 0, 56]])
    for sl in (slice(10, 20), slice(0, 0), slice(None), slice(11, 13), slice(50, 99),
               slice(3, 40, 5), slice(-4, None), slice(20, 10)):
        np.testing.assert_array_equal(arr[sl], a[sl])
    np.testing.assert_array_equal(arr[2:30, 1:3], a[2:30, 1:3])
    np.testing.assert_array_equal(arr[-1], a[-1])
    with pytest.raises(IndexError):
        arr[[57]]


def test_stats_match_numpy(tmp_path):
    s = make_store(tmp_path / "s", skip={2, 9})
    a = np.asarray(s.array("a"), np.float64)
    stats = s.layer_stats("a")
    np.testing.assert_allclose(stats["mean"], a.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["std"], a.std(0), rtol=1e-8)
    norms = np.linalg.norm(a, axis=1)
    assert stats["count"] == len(a)
    assert stats["norm_mean"] == pytest.approx(norms.mean(), rel=1e-10)
    assert stats["norm_std"] == pytest.approx(norms.std(), rel=1e-6)
    assert stats["norm_max"] == pytest.approx(norms.max())
    bin_ratio = 10 ** ((st.NORM_LOG10_RANGE[1] - st.NORM_LOG10_RANGE[0]) / st.NORM_BINS)
    med = stats["norm_quantiles"]["0.5"]
    assert np.median(norms) / bin_ratio <= med <= np.median(norms) * bin_ratio
    assert sum(stats["norm_hist"]["counts"]) == len(a)


def test_corrupt_shard_detected_by_checksum(tmp_path):
    make_store(tmp_path / "s")
    shard = st.list_shards(tmp_path / "s")[1]
    sf = st.ShardFile(shard)
    start, _ = sf.tensors["a"]["data_offsets"]
    with open(shard, "r+b") as f:  # flip one byte inside the vectors of layer "a"
        f.seek(sf.data_start + start + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    s = ActivationStore.open(tmp_path / "s")  # lazy: opening is cheap and still works
    np.asarray(s.array("b"))  # other tensors of the shard are intact
    with pytest.raises(CorruptShardError, match="sha256"):
        np.asarray(s.array("a"))
    with pytest.raises(CorruptShardError):
        list(s.iter_batches("a", 8))
    with pytest.raises(CorruptShardError, match="sha256 mismatch"):
        ActivationStore.open(tmp_path / "s", verify="full")
    np.asarray(ActivationStore.open(tmp_path / "s", verify=False).array("a"))


def test_missing_shard_and_incomplete_store(tmp_path):
    make_store(tmp_path / "s")
    st.list_shards(tmp_path / "s")[0].unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        ActivationStore.open(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(StoreIncompleteError, match="re-run"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreIncompleteError, match="in no shard"):
        st.finalize_store(tmp_path / "s", 20, {})
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(tmp_path)


def test_iter_batches_covers_everything_once_and_shuffles(tmp_path):
    s = make_store(tmp_path / "s", n_images=40, shard_size=3)
    ids = np.sort(np.asarray(s.array("a"))[:, 0])
    seq = torch.cat(list(s.iter_batches("a", 16, shuffle=False)))
    np.testing.assert_array_equal(seq[:, 0].numpy(), np.asarray(s.array("a"))[:, 0])
    batches = list(s.iter_batches("a", 16, seed=1, buffer_size=32, epochs=2))
    assert all(b.dtype == torch.float32 and b.shape[1] == 6 for b in batches)
    got = torch.cat(batches)[:, 0].numpy()
    assert len(got) == 2 * len(ids)
    np.testing.assert_array_equal(np.sort(got[: len(ids)]), ids)  # epoch 1: each row once
    np.testing.assert_array_equal(np.sort(got[len(ids):]), ids)  # epoch 2 too
    assert not np.array_equal(got[: len(ids)], got[len(ids):])  # epochs differ in order
    assert not np.array_equal(got[: len(ids)], seq[:, 0].numpy())  # and from storage order
    again = torch.cat(list(s.iter_batches("a", 16, seed=1, buffer_size=32, epochs=2)))
    np.testing.assert_array_equal(again[:, 0].numpy(), got)  # seeded
    sub = torch.cat(list(s.iter_batches("a", 7, images=[3, 17, 30])))
    assert sorted((sub[:, 0].numpy() // 10).astype(int).tolist()) == [3] * 3 + [17] * 3 + [30] * 3
    b16 = next(s.iter_batches("b", 5, dtype=torch.float16))
    assert b16.dtype == torch.float16
    assert [len(b) for b in s.iter_batches("a", 50, drop_last=True)] == [50, 50]


def test_iter_batches_memory_is_bounded(tmp_path):
    path = tmp_path / "big"
    lock = StoreLock(path).acquire()
    cfg = _config(layers=["a"], widths={"a": {"channels": 256, "grid": [1, 1],
                                              "branches": None}})
    cfg["source"]["n_images"] = 2000
    st.prepare_store(path, cfg)
    w = ShardWriter(path, 0, ["a"], {"a": 256}, "fp32", shard_size=200)
    rng = np.random.default_rng(0)
    for i in range(2000):  # 2000 x 10 x 256 x 4 B = 20 MB on disk
        w.add(i, str(i), None, {"a": rng.random((10, 256), np.float32)},
              {"a": np.zeros((10, 4), np.int64)})
    w.flush()
    st.finalize_store(path, 2000, {})
    lock.release()
    s = ActivationStore.open(path)
    tracemalloc.start()
    n = sum(len(b) for b in s.iter_batches("a", 256, buffer_size=2048))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 20000
    buffer_bytes = 2048 * 256 * 4
    assert peak < 2 * buffer_bytes + 1e6, f"reader peak {peak / 1e6:.1f} MB for a 20 MB store"


def test_split_images_disjoint_and_seeded(tmp_path):
    s = make_store(tmp_path / "s", skip={0, 5})
    tr, he = s.split_images(0.25, seed=3)
    assert len(he) == round(18 * 0.25) and not set(tr) & set(he)
    assert set(tr) | set(he) == set(range(20)) - {0, 5}
    np.testing.assert_array_equal(he, s.split_images(0.25, seed=3)[1])
    # the content hash names exactly these vectors: stable on reopen, another content differs
    assert s.content_hash() == ActivationStore.open(tmp_path / "s").content_hash()
    assert s.content_hash() != make_store(tmp_path / "t", skip={0, 6}).content_hash()


def test_lock_refuses_second_writer_and_takes_over_stale_lock(tmp_path):
    path = tmp_path / "s"
    first = StoreLock(path).acquire()
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        StoreLock(path).acquire()
    first.release()
    # A live writer in another process.
    code = ("import fcntl,os,sys,time,json; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd,fcntl.LOCK_EX); os.write(fd,json.dumps({'pid':os.getpid()}).encode());"
            "print('locked',flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path / ".lock")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            StoreLock(path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # Its lock file is left behind by a dead pid: stale, taken over.
    assert json.loads((path / ".lock").read_text())["pid"] == proc.pid
    lock = StoreLock(path).acquire()
    assert lock.replaced_stale == {"pid": proc.pid}
    lock.release()


def test_config_mismatch_is_a_clear_error(tmp_path):
    make_store(tmp_path / "s")
    with pytest.raises(StoreConfigMismatch, match="sampling"):
        st.prepare_store(tmp_path / "s", _config(sampling={"method": "uniform"}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        st.prepare_store(tmp_path / "other", _config())


def test_disk_full_leaves_store_consistent_and_resumable(tmp_path, monkeypatch):
    path = tmp_path / "s"
    real, calls = st.shard._write_bytes, []

    def full_disk(f, data):
        calls.append(1)
        if len(calls) > 13:  # first shard (1 header + 12 tensors) fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(st.shard, "_write_bytes", full_disk)
    with pytest.raises(StoreError, match="disk is full.*re-run"):
        make_store(path)
    assert len(st.list_shards(path)) == 1
    assert not [p for p in (path / "shards").iterdir() if p.name.endswith(".tmp")]
    assert st.done_images(path) == {0, 1, 2, 3}
    assert not (path / "manifest.json").exists()
    monkeypatch.setattr(st.shard, "_write_bytes", real)
    s = make_store(path)  # the same command again resumes
    ids = np.asarray(s.array("a"))[:, 0]
    np.testing.assert_array_equal(np.sort(ids), [i * 10 + k for i in range(20) for k in range(3)])
    assert [r["file"][:11] for r in s.manifest["shards"]] == [f"r000-{k:06d}" for k in range(5)]


def test_unwritable_destination(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        StoreLock(tmp_path / "file" / "store").acquire()
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop writes")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            StoreLock(ro / "store").acquire()
    finally:
        ro.chmod(0o700)


def test_leftover_temp_files_are_cleaned(tmp_path):
    path = tmp_path / "s"
    make_store(path)
    tmp = path / "shards" / ".r000-000009-x.safetensors.abc.tmp"
    tmp.write_bytes(b"half a shard")
    time.sleep(0.01)
    st.prepare_store(path, _config())
    assert not tmp.exists()
