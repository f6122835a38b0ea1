"""SAE training: data order, planted-dictionary recovery, AuxK, metrics, resume after SIGKILL,
the activation store path, and DDP (torchrun, gloo) against one process."""

from __future__ import annotations

import json
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

from _synthetic import planted_dictionary, recovered_fraction
from branchlens import sae_kernels
from branchlens.sae import SAEConfig, TopKSAE, load_meta
from branchlens.train import (
    ArrayBatches,
    StoreBatches,
    TrainConfig,
    lr_at,
    train_layers,
    train_sae,
)
from branchlens.train.loop import train_threads
from branchlens.variants import branch_slices

QUIET = {"progress": False, "plot": False}


def test_array_batches_cover_each_row_once_and_fast_forward(tmp_path):
    x = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ab = ArrayBatches(x, 64, seed=1, chunk=50, buffer_chunks=4, drop_last=False)
    e0 = [b[:, 0].numpy() for b in ab.epoch(0)]
    assert sorted(np.concatenate(e0).tolist()) == x[:, 0].tolist()
    assert not np.array_equal(np.concatenate(e0), x[:, 0])  # shuffled
    e1 = [b[:, 0].numpy() for b in ab.epoch(1)]
    assert not np.array_equal(np.concatenate(e1), np.concatenate(e0))  # per-epoch order
    ff = [b[:, 0].numpy() for b in ab.epoch(0, start=5)]
    assert all(np.array_equal(a, b) for a, b in zip(ff, e0[5:], strict=True))
    mb = ArrayBatches(mm, 64, seed=1, chunk=50, buffer_chunks=4, drop_last=False)
    assert all(np.array_equal(a[:, 0].numpy(), b) for a, b in zip(mb.epoch(0), e0, strict=True))
    rows = np.arange(0, 1000, 3)  # a subset of rows (e.g. training images only)
    sub = ArrayBatches(x, 32, rows=rows, chunk=40)
    got = np.concatenate([b[:, 0].numpy() for b in sub.epoch(0)])
    assert len(got) == len(rows) // 32 * 32 and set(got) <= set(x[rows, 0])


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, decay="linear", decay_frac=0.5)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[49] == 1.0
    assert lrs[75] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.02)


@pytest.mark.slow
def test_planted_dictionary_is_recovered(tmp_path):
    """1,024 unit-norm atoms, each on one branch slice of mixed4c, 32 active per sample.

    (2,048 atoms = 4x overcomplete in every branch subspace also works but needs several times
    more steps than a unit test can afford: 36 % recovered after 150 k vectors.)
    """
    atoms, x = planted_dictionary(1024, 60_000, k=32, layer="mixed4c", noise=0.01, seed=0)
    slices = list(branch_slices("bvlc_googlenet", "mixed4c").values())
    support = [(atoms[:, s].norm(dim=1) > 0.999) for s in slices]
    assert torch.stack(support).sum(0).eq(1).all()  # every atom lives in exactly one branch
    sae_cfg = SAEConfig(d_in=512, n_latents=2048, k=32, aux=False)  # AuxK: see test below
    cfg = TrainConfig(batch_size=256, lr=2e-3, steps=1400, warmup_steps=20, decay="none",
                      log_every=100,
                      ckpt_every=10**9, init_sample=8192, eval_max_vectors=4096, **QUIET)
    t0 = time.process_time()
    sae = train_sae(ArrayBatches(x, 256, seed=0), sae_cfg, cfg, tmp_path)
    rec = recovered_fraction(atoms, sae.decoder_directions(), 0.9)
    print(f"planted: recovered {rec:.3f}, cpu {time.process_time() - t0:.1f}s, "
          f"eval {sae.meta['eval']}")
    assert rec >= 0.95
    assert recovered_fraction(atoms, torch.randn(2048, 512), 0.9) == 0  # the bar is not trivial


def _dying_data(n: int = 4096) -> torch.Tensor:
    """Positive data in an 8-dim subspace of 32 dims: most random latents never win the TopK."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 8, generator=g))[0].t()
    return torch.rand(n, 8, generator=g).pow(3) @ basis


def test_auxk_trains_only_dead_latents_on_the_residual():
    """AuxK gives dead latents (and only them) a gradient that fits the main residual."""
    torch.manual_seed(0)
    x = _dying_data(2048)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=4, k_aux=8, dead_after=1))
    sae.init_from_sample(x)
    sae.since_fired[64:] = 1  # latents 64.. are dead
    dead = sae.dead_mask()
    loss, st = sae.loss(x[:256], dead=dead)
    (g_main,) = torch.autograd.grad(sae.loss(x[:256])[0], sae.W_dec)
    (g_all,) = torch.autograd.grad(loss, sae.W_dec)
    g_aux = g_all - g_main
    assert g_aux[:64].abs().max() == 0 and g_aux[64:].abs().sum() > 0
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    auxes = []
    for _ in range(60):  # the dead set is held fixed: the residual fit must improve
        loss, st = sae.loss(x[:256], dead=dead)
        auxes.append(float(st["aux"]))
        sae.update(loss, opt)
    assert auxes[-1] < 0.5 * auxes[0]


def _reference_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One training step written out densely with plain autograd: the formulation the sparse
    step (kernels or torch ops) must reproduce up to float noise."""
    cfg = sae.cfg
    dead = sae.since_fired >= cfg.dead_after
    xs = x * cfg.scale
    pre = (xs - sae.b_pre) @ sae.W_enc.t() + sae.b_latent
    idx = pre.topk(cfg.k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    xhat = z @ sae.W_dec + sae.b_pre
    loss = (xhat - xs).pow(2).sum(1).mean() / cfg.var_total
    if dead.any():
        aidx = pre.masked_fill(~dead, -float("inf")).topk(min(cfg.k_aux, int(dead.sum())),
                                                          dim=1).indices
        za = torch.zeros_like(pre).scatter(1, aidx, pre.gather(1, aidx)).relu()
        resid = (xs - xhat).detach()
        loss = loss + cfg.aux_coef * (za @ sae.W_dec - resid).pow(2).sum() / resid.pow(2).sum()
    opt.zero_grad()
    loss.backward()
    with torch.no_grad():
        w, g = sae.W_dec, sae.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w
        opt.step()
        w /= w.norm(dim=1, keepdim=True)
        sae.since_fired += x.shape[0]
        sae.since_fired[(z > 0).any(0)] = 0


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_training_steps_match_dense_reference(kernels, monkeypatch):
    """Same seed, same batches: the sparse step (CPU kernels, or the torch ops they replace)
    gives the dense reference's weights, latents and FVU after steps that use AuxK."""
    monkeypatch.setattr(sae_kernels, "ENABLED", kernels and sae_kernels.AVAILABLE)
    x = _dying_data(8 * 256 + 512)
    batches, held = x[:-512].split(256), x[-512:]
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=4, k_aux=16, dead_after=512), seed=0)
    sae.init_from_sample(x[:2048])
    ref = TopKSAE(SAEConfig(**sae.cfg.to_dict()), seed=0)
    ref.load_state_dict(sae.state_dict())
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, foreach=False)
    dead_steps = 0
    for xb in batches:
        dead_steps += bool(sae.dead_mask().any())
        loss, st = sae.loss(xb, dead=sae.dead_mask())
        sae.update(loss, opt)
        sae.count_firing(st, xb.shape[0])
        _reference_step(ref, ref_opt, xb)
        assert torch.equal(sae.since_fired, ref.since_fired)
    assert dead_steps >= 4  # AuxK was on for most steps
    for (name, a), b in zip(sae.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    with torch.no_grad():
        (xh, info), (xr, rinfo) = sae(held), ref(held)
    assert torch.equal(info["idx"].sort(1).values, rinfo["idx"].sort(1).values)

    def fvu(xhat):
        return float((xhat - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())

    assert fvu(xh) == pytest.approx(fvu(xr), rel=1e-4)


def test_training_sets_its_thread_count(tmp_path, monkeypatch):
    """train.threads, else OMP_NUM_THREADS, else the cores this process may use (split among
    the node's DDP processes); set while training, the caller's count restored after."""
    import branchlens.threads as T

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv(T.ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(T, "busy_elsewhere", lambda: 0.0)
    assert train_threads(TrainConfig()) == cores
    monkeypatch.setattr(T, "busy_elsewhere", lambda: 1.0)  # another process keeps a core busy
    assert train_threads(TrainConfig()) == max(1, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert train_threads(TrainConfig()) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train_threads(TrainConfig()) == 3 and train_threads(TrainConfig(threads=5)) == 5
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=0)
    seen = []
    x = _dying_data(1024)

    def batches(epoch):
        seen.append(torch.get_num_threads())
        return x.split(256)

    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    train_sae(batches, SAEConfig(d_in=32, n_latents=64, k=4),
              TrainConfig(batch_size=256, steps=4, warmup_steps=1, threads=want, init_sample=512,
                          **QUIET),
              tmp_path / "sae")
    assert seen and set(seen) == {want} and torch.get_num_threads() == before


def test_metrics_plot_and_cfg(tmp_path):
    x = _dying_data(2048)
    held = _dying_data(600)
    sae_cfg = SAEConfig.for_layer("bvlc_googlenet", "mixed4c_5x5", expansion=1, k=4)
    assert sae_cfg.d_in == 64 and sae_cfg.branch_slices == {"5x5": [0, 64]}
    x = torch.cat([x, x], 1)
    held = torch.cat([held, held], 1)
    cfg = TrainConfig(batch_size=128, steps=40, warmup_steps=5, log_every=10, ckpt_every=25,
                      progress=False, seed=3)
    sae = train_sae(x, sae_cfg, cfg, tmp_path,
                    heldout=ArrayBatches(held, 128, drop_last=False), meta={"store_hash": "h"})
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:-1]] == [10, 20, 30, 40] and rows[-1]["final"]
    for key in ("fvu", "nmse", "l0", "dead_frac", "aux_loss", "vec_per_s", "lr"):
        assert key in rows[0]
    assert rows[-1]["heldout"]["n"] == 600 and 0 < rows[-1]["heldout"]["fvu"] < 2
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / "cfg.json").read_text())
    assert doc["sae"]["layer"] == "mixed4c_5x5" and doc["sae"]["variant"] == "bvlc_googlenet"
    assert doc["sae"]["k"] == 4 and doc["sae"]["scale"] > 0 and doc["store_hash"] == "h"
    assert doc["seed"] == 3 and doc["train"]["step"] == 40 and "branchlens_version" in doc
    assert doc["eval"]["heldout"]["fvu"] == rows[-1]["heldout"]["fvu"]
    # finished: Adam's state (2x the weights) is gone, and a re-run still finds the SAE done
    assert list(tmp_path.glob("optim-step*.safetensors")) == []
    assert load_meta(tmp_path)["train"]["step"] == 40 and sae.cfg.dead_after == 1024
    before = _weights(tmp_path)
    fresh = SAEConfig.for_layer("bvlc_googlenet", "mixed4c_5x5", expansion=1, k=4)
    again = train_sae(x, fresh, cfg, tmp_path,
                      heldout=ArrayBatches(held, 128, drop_last=False), meta={"store_hash": "h"})
    assert again.meta["eval"] == doc["eval"]
    assert all(torch.equal(before[k], v) for k, v in _weights(tmp_path).items())
    kept = tmp_path / "kept"
    cfg.keep_optimizer = True
    train_sae(x, SAEConfig.for_layer("bvlc_googlenet", "mixed4c_5x5", expansion=1, k=4), cfg,
              kept, meta={"store_hash": "h"})
    assert [p.name for p in kept.glob("optim-step*")] == ["optim-step000000040.safetensors"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "branchlens", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "weights.safetensors")


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    x = _dying_data(8192).numpy()
    np.save(tmp_path / "x.npy", np.concatenate([x, x[:, ::-1]], 1))
    args = ["--layers", "syn", "--from-npy", str(tmp_path / "x.npy"), "--expansion", "8",
            "--k", "4", "--k-aux", "16", "--dead-after", "4096", "--batch-size", "128",
            "--steps", "600", "--ckpt-every", "50", "--log-every", "25", "--epochs", "1",
            "--no-progress", "--seed", "5"]
    ref = subprocess.run(_cli(str(tmp_path / "a"), *args), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "b" / "sae" / "syn"
    proc = subprocess.Popen(_cli(str(tmp_path / "b"), *args), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "weights.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 120
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_meta(out)["train"]["step"]
    assert 0 < killed_at < 600
    again = subprocess.run(_cli(str(tmp_path / "b"), *args), env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    a, b = _weights(tmp_path / "a" / "sae" / "syn"), _weights(out)
    for name in a:
        assert (a[name].double() - b[name].double()).abs().max() <= 1e-5, name
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:-1] == list(range(25, 601, 25))  # resumed log has no gaps or repeats
    print(f"killed at step {killed_at}, resumed to 600, weights equal within 1e-5")


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    x = _dying_data(4096).numpy()
    np.save(tmp_path / "x.npy", np.concatenate([x, x[:, ::-1]], 1))
    args = ["--layers", "syn", "--from-npy", str(tmp_path / "x.npy"), "--expansion", "4",
            "--k", "4", "--k-aux", "16", "--dead-after", "1024", "--batch-size", "256",
            "--steps", "30", "--ckpt-every", "1000", "--log-every", "10", "--no-progress"]
    one = subprocess.run(_cli(str(tmp_path / "one"), *args), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "branchlens",
                          "train", str(tmp_path / "two"), *args], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "sae" / "syn"), _weights(tmp_path / "two" / "sae" / "syn")
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), atol=1e-4, rtol=1e-4), name
    meta = load_meta(tmp_path / "two" / "sae" / "syn")
    assert meta["train"]["world_size"] == 2
    m1 = [json.loads(ln) for ln in (tmp_path / "one/sae/syn/metrics.jsonl").open()]
    m2 = [json.loads(ln) for ln in (tmp_path / "two/sae/syn/metrics.jsonl").open()]
    assert m1[-2]["fvu"] == pytest.approx(m2[-2]["fvu"], rel=1e-4)


def _make_store(path: Path, layer: str, n_images: int = 12, per_image: int = 20):
    from _synthetic import write_synthetic

    return write_synthetic(path, layer, n_images, per_image, d=64, images_per_shard=4)


def test_train_from_activation_store(tmp_path):
    layer = "mixed4c_pool"
    store = _make_store(tmp_path / "store", layer)
    sb = StoreBatches(store, layer, 16, seed=0, images=[0, 1, 2, 3, 4])
    assert sb.n_vectors == 100
    full = list(sb.epoch(2))
    assert all(torch.equal(a, b) for a, b in zip(sb.epoch(2, start=3), full[3:], strict=True))
    cfg = TrainConfig(batch_size=32, steps=12, warmup_steps=2, log_every=4, ckpt_every=6,
                      heldout_fraction=0.25, **QUIET)
    saes = train_layers(tmp_path, [layer], {"k": 4}, cfg, expansion=2)
    sae = TopKSAE.load(tmp_path / "sae" / layer)
    doc = json.loads((tmp_path / "sae" / layer / "cfg.json").read_text())
    assert doc["store_hash"] == store.content_hash() and doc["heldout_images"] == 3
    assert doc["eval"]["heldout"]["n"] == 3 * 20 and doc["train"]["n_train_vectors"] == 9 * 20
    assert sae.cfg.n_latents == 128 and saes[layer].meta["train"]["step"] == 12
