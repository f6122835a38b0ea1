"""Training loop for TopK SAEs: deterministic data order, metrics, atomic checkpoints, DDP.

Resumability: the data order of epoch ``e`` is a pure function of ``(seed, e)`` and every batch
is addressed by ``(epoch, batch_in_epoch)``, so a checkpoint (weights + Adam state + those two
counters) restarts on exactly the batch an uninterrupted run would have seen next.

Data parallel: run under ``torchrun``; every process sees the same global batch order, takes its
own contiguous slice, and gradients are summed over processes (losses are divided by the global
batch), so N processes compute the same update as one process on the whole batch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from branchlens.distributed import Dist
from branchlens.sae import SAEConfig, TopKSAE, load_meta
from branchlens.threads import Governor
from branchlens.train.checkpoint import (
    check_finite,
    load_optimizer_state,
    open_resume,
    optim_path,
    resume_key,
    save_checkpoint,
)
from branchlens.train.config import NonFiniteLossError, TrainConfig
from branchlens.train.metrics import MetricsWindow, evaluate, plot_metrics, trim_metrics
from branchlens.train.sampling import as_batches, default_dead_after, init_sample


# ---------------------------------------------------------------------------------------------
# Distributed helpers (world size 1 is the same code path).
# ---------------------------------------------------------------------------------------------
def make_adam(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Adam:
    """Fused Adam (one pass over each tensor) where this torch build has it for the device."""
    try:
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def train_threads(cfg: TrainConfig) -> int:
    """Torch threads for training: ``train.threads``, else :func:`branchlens.threads.
    choose_threads` (``$BRANCHLENS_THREADS``, ``$OMP_NUM_THREADS``, else the cores this process
    may use, shared among the node's DDP processes, less those other processes keep busy), so
    that training never runs more threads than free cores."""
    from branchlens.threads import choose_threads

    return choose_threads(cfg.threads)[0]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, constant, then (optionally) decay to 0 over the last ``decay_frac``."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    start = total * (1 - cfg.decay_frac)
    if cfg.decay != "none" and step >= start and total > start:
        t = (step - start) / (total - start)
        lr *= (1 - t) if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return lr



def train_sae(data: Any, sae_cfg: SAEConfig, cfg: TrainConfig, out_dir: str | Path,
              heldout: Any = None, meta: dict[str, Any] | None = None, restart: bool = False,
              log: Callable[[str], None] = print) -> TopKSAE:
    """Train (or resume) one SAE into ``out_dir``; returns the trained model.

    ``data``: :class:`Batches`, an array, or ``fn(epoch) -> batches``. ``heldout``: vectors of
    held-out images (a :class:`Batches` or an iterable factory) for the final FVU. A checkpoint
    made under other settings is discarded when ``restart`` and refused otherwise. One process
    at a time may write ``out_dir`` (``.<name>.lock`` next to it; rank 0 holds it). Runs on
    :func:`train_threads` torch threads (the caller's count is restored after).
    """
    from branchlens.store import RunLock

    out = Path(out_dir)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:
        lock = RunLock(out.parent, "SAE folder", f".{out.name}.lock").acquire()
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads(cfg))
    try:
        sae = _train_sae(data, sae_cfg, cfg, out, heldout, meta, restart, log)
        sae.release_workspace()  # callers keep trained SAEs (one per layer), not their buffers
        return sae
    finally:
        torch.set_num_threads(threads)
        if lock is not None:
            lock.release()


def total_steps(cfg: TrainConfig, n_vectors: int | None) -> int:
    """``train.steps``, else ``train.epochs`` full batches of the data."""
    B = cfg.batch_size
    if cfg.steps is not None:
        total = cfg.steps
    elif n_vectors is not None:
        total = int(cfg.epochs * (n_vectors // B))
        if total < 1:
            raise ValueError(f"{cfg.epochs} epochs of {n_vectors} vectors are no full "
                             f"batch of {B}: lower batch_size or give steps")
    else:
        raise ValueError("give steps when the data size is unknown")
    if cfg.warmup_steps > total:
        warnings.warn(f"warmup_steps={cfg.warmup_steps} is longer than the run ({total} steps): "
                      "the learning rate never reaches its set value", stacklevel=3)
    return total


def _start(out: Path, resume: bool, sae_cfg: SAEConfig, cfg: TrainConfig, batches: Any,
           total: int, device: torch.device
           ) -> tuple[TopKSAE, torch.optim.Optimizer, tuple[int, int, int]]:
    """The SAE, its optimizer and (step, epoch, batch_in_epoch): from the checkpoint in ``out``
    when resuming (Adam state too, unless the SAE finished and its state was dropped), else
    freshly initialised from a sample of the data."""
    if resume:
        sae = TopKSAE.load(out)
        tmeta = load_meta(out)["train"]
        check_finite(sae, tmeta["step"], f"checkpoint {out / 'weights.safetensors'}")
        counters = (tmeta["step"], tmeta["epoch"], tmeta["batch_in_epoch"])
    else:
        sae = TopKSAE(sae_cfg, seed=cfg.seed)
        sae.init_from_sample(init_sample(batches, cfg.init_sample))
        counters = (0, 0, 0)
    sae = sae.to(device)
    opt = make_adam(list(sae.parameters()), cfg)
    step = counters[0]
    if resume:
        finished = step >= total and "eval" in load_meta(out)
        if not finished or optim_path(out, step).exists():
            load_optimizer_state(out, step, sae, opt, require_checksum="resume_key" in tmeta)
    return sae, opt, counters


def _final_eval(sae: TopKSAE, batches: Any, heldout: Any, cfg: TrainConfig) -> dict:
    """FVU and friends on held-out images (when given) and on training data."""
    out = {}
    if heldout is not None:
        hb = as_batches(heldout, cfg.batch_size, cfg.seed)
        out["heldout"] = evaluate(sae, hb.epoch(0), cfg.eval_max_vectors)
    out["train"] = evaluate(sae, batches.epoch(0), cfg.eval_max_vectors)
    return out


def _train_sae(data: Any, sae_cfg: SAEConfig, cfg: TrainConfig, out: Path, heldout: Any,
               meta: dict[str, Any] | None, restart: bool, log: Callable[[str], None]
               ) -> TopKSAE:
    from branchlens.devices import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dist = Dist(device)
    batches = as_batches(data, cfg.batch_size, cfg.seed)
    B = cfg.batch_size
    if B % dist.world:
        raise ValueError(f"batch size {B} not divisible by world size {dist.world}")
    total = total_steps(cfg, batches.n_vectors)
    sae_cfg.dead_after = sae_cfg.dead_after or default_dead_after(batches.n_vectors)
    key = resume_key(sae_cfg, cfg, meta)

    resume = dist.rank == 0 and open_resume(out, key, sae_cfg, cfg, meta, restart, log)
    resume = bool(dist.sum(torch.tensor(int(resume))).item()) if dist.on else resume
    sae, opt, (step, epoch, bi) = _start(out, resume, sae_cfg, cfg, batches, total, device)
    params = list(sae.parameters())
    base_meta = {**(meta or {}), "seed": cfg.seed}
    last_good = step
    metrics_path = out / "metrics.jsonl"
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            trim_metrics(metrics_path, step)
        else:
            metrics_path.unlink(missing_ok=True)

    def train_meta() -> dict:
        return {**base_meta, "train": {
            "step": step, "epoch": epoch, "batch_in_epoch": bi, "total_steps": total,
            "vectors": step * B, "n_train_vectors": batches.n_vectors,
            "dead_after": sae.cfg.dead_after, "world_size": dist.world, "config": asdict(cfg),
            "resume_key": key}}

    from branchlens.progress import progress

    window = MetricsWindow(sae.cfg.d_in)
    lo, hi = dist.rank * B // dist.world, (dist.rank + 1) * B // dist.world
    it = batches.epoch(epoch, bi)
    governor = Governor(cfg.threads)  # follows the other processes' load at each log step
    with progress(total * B, f"sae {sae.cfg.layer or ''}".strip(), "vec",
                  disable=not cfg.progress or dist.rank != 0) as bar:
        bar.update(step * B)
        while step < total:
            x = next(it, None)
            if x is None:
                if bi == 0:
                    raise ValueError("an epoch yielded no full batch")
                epoch, bi = epoch + 1, 0
                it = batches.epoch(epoch, 0)
                continue
            bi += 1
            if x.shape[0] != B:
                continue
            x = x[lo:hi].to(device, non_blocking=True).float()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            loss, st = sae.loss(x, B, sae.dead_mask(), dist.sum)
            global_loss = float(dist.sum(loss.detach().clone()))
            if not math.isfinite(global_loss):
                raise NonFiniteLossError(
                    f"loss is {global_loss} at step {step + 1} of {total}: training diverged "
                    f"(lower lr?); the last good checkpoint (step {last_good}) in {out} is kept")
            sae.update(loss, opt, lambda: dist.sum_grads(params))
            sae.count_firing(st, B, dist.sum)
            window.add(x * sae.cfg.scale, st, loss.detach())
            step += 1
            if step % cfg.log_every == 0 or step == total:
                changed = governor.check()
                if changed is not None:
                    log(f"{sae.cfg.layer or 'sae'}: now {changed} thread(s) (other processes' "
                        "load changed)")
                row = {"step": step, "epoch": epoch, "vectors": step * B,
                       "lr": opt.param_groups[0]["lr"],
                       **window.summary(dist, cfg.log_every if step % cfg.log_every == 0
                                        else step % cfg.log_every),
                       "dead_frac": float(sae.dead_mask().float().mean())}
                window.reset()
                if dist.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.update(B, fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                           dead=f"{row['dead_frac']:.3f}")
            else:
                bar.update(B)
            if step % cfg.ckpt_every == 0 or step == total:
                check_finite(sae, step, f"training diverged (last good checkpoint: step "
                                        f"{last_good} in {out})")
                if dist.rank == 0:
                    save_checkpoint(out, sae, opt, train_meta())
                dist.barrier()
                last_good = step

    final = load_meta(out) if resume and step == total else None
    if final and "eval" in final:
        sae.meta = final
        return sae
    evals = {"dead_frac": float(sae.dead_mask().float().mean()),
             "dead_after": sae.cfg.dead_after}
    if dist.rank == 0:
        evals |= _final_eval(sae, batches, heldout, cfg)
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"final": True, "step": step, **evals}) + "\n")
        save_checkpoint(out, sae, opt, {**train_meta(), "eval": evals})
        if not cfg.keep_optimizer:  # finished: nothing resumes from it any more
            optim_path(out, step).unlink(missing_ok=True)
        if cfg.plot:
            plot_metrics(metrics_path, out / "metrics.png")
    dist.barrier()
    sae.meta = {**train_meta(), "eval": evals}
    return sae
