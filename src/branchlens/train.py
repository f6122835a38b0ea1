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
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from branchlens.artifacts import ArtifactError, load_tensors, save_tensors, write_atomic
from branchlens.distributed import Dist
from branchlens.sae import DEFAULT_DEAD_AFTER, SAEConfig, TopKSAE, load_meta

DECAYS = ("none", "linear", "cosine")
# Settings that change no trained weight: excluded from the resume key (and the stage hash).
NON_ARTIFACT_KEYS = ("progress", "plot", "device", "keep_optimizer")


class NonFiniteLossError(RuntimeError):
    """Training diverged; the last good checkpoint is kept on disk."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class TrainConfig:
    batch_size: int = 4096
    lr: float = 4e-4
    epochs: float = 10.0  # used when steps is None
    steps: int | None = None
    warmup_steps: int = 100
    decay: str = "linear"  # "none" | "linear" | "cosine": to 0 over the last decay_frac
    decay_frac: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    init_sample: int = 65536  # vectors for the input scale and the geometric median
    heldout_fraction: float = 0.1
    eval_max_vectors: int = 200_000
    plot: bool = True
    progress: bool = True
    device: str = "cpu"  # "auto" | "cpu" | "cuda[:N]": where the SAE and its batches live
    keep_optimizer: bool = False  # keep Adam's state (2× the weights) once training finished

    def __post_init__(self) -> None:
        """Refuse values that would divide by zero, never train, or train on NaN."""
        self.betas = tuple(self.betas)  # type: ignore[assignment]  (JSON gives a list)
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"lr must be finite and > 0, got "
                 f"{self.lr}")
        _require(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(math.isfinite(self.epochs) and self.epochs > 0,
                 f"epochs must be finite and > 0, got {self.epochs}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.decay in DECAYS, f"decay must be one of {DECAYS}, got {self.decay!r}")
        _require(0 <= self.decay_frac <= 1, f"decay_frac must be in [0, 1], got {self.decay_frac}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"betas must be two numbers in [0, 1), got {self.betas}")
        _require(math.isfinite(self.eps) and self.eps > 0, f"eps must be > 0, got {self.eps}")
        _require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _require(self.ckpt_every >= 1, f"ckpt_every must be >= 1, got {self.ckpt_every}")
        _require(self.init_sample >= 1, f"init_sample must be >= 1, got {self.init_sample}")
        _require(0 <= self.heldout_fraction < 1,
                 f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        _require(self.eval_max_vectors >= 1,
                 f"eval_max_vectors must be >= 1, got {self.eval_max_vectors}")


# ---------------------------------------------------------------------------------------------
# Data: anything that yields the global batches of epoch e, restartable at a batch index.
# ---------------------------------------------------------------------------------------------
class Batches:
    """Global batches of an epoch, addressable as ``epoch(e, start)`` (deterministic)."""

    n_vectors: int | None = None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:  # pragma: no cover
        raise NotImplementedError


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class ArrayBatches(Batches):
    """Block-shuffled batches from an array or a memory-mapped ``.npy`` with bounded memory.

    The epoch order permutes chunks of ``chunk`` consecutive rows, then shuffles rows within
    windows of ``buffer_chunks`` chunks (the shuffle buffer). Memory-mapped arrays are read with
    plain file reads, so resident memory stays at one window however large the file is.
    """

    def __init__(self, array: np.ndarray | Tensor, batch_size: int, seed: int = 0,
                 rows: np.ndarray | None = None, chunk: int = 2048, buffer_chunks: int = 64,
                 drop_last: bool = True):
        self.array = array.numpy() if isinstance(array, Tensor) else array
        self.rows = (np.arange(len(self.array)) if rows is None
                     else np.sort(np.asarray(rows, dtype=np.int64)))
        self.batch_size, self.seed = batch_size, seed
        self.chunk, self.buffer_chunks, self.drop_last = chunk, buffer_chunks, drop_last
        self.n_vectors = len(self.rows)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
        n, c = len(self.rows), self.chunk
        order = rng.permutation(math.ceil(n / c))
        out = []
        for w in range(0, len(order), self.buffer_chunks):
            pos = np.concatenate([np.arange(i * c, min((i + 1) * c, n))
                                  for i in order[w:w + self.buffer_chunks]])
            out.append(pos[rng.permutation(len(pos))])
        return out

    def _read(self, pos: np.ndarray) -> np.ndarray:
        """Rows ``self.rows[pos]`` (any order), read chunk by chunk as contiguous spans."""
        out = np.empty((len(pos), self.array.shape[1]), dtype=np.float32)
        chunk_of = pos // self.chunk
        for ci in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == ci)[0]
            rows = self.rows[pos[sel]]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            out[sel] = _read_span(self.array, lo, hi)[rows - lo]
        return out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        B = self.batch_size
        skip = start * B
        carry = np.empty((0, self.array.shape[1]), dtype=np.float32)
        for pos in self._windows(epoch):
            if skip >= len(pos):
                skip -= len(pos)
                continue
            data = np.concatenate([carry, self._read(pos[skip:])])
            skip = 0
            nfull = len(data) // B
            for i in range(nfull):
                yield torch.from_numpy(data[i * B:(i + 1) * B])
            carry = data[nfull * B:]
        if len(carry) and not self.drop_last:
            yield torch.from_numpy(carry)


def _read_span(arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    import mmap

    if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.flags.c_contiguous:
        row = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        flat = np.fromfile(arr.filename, dtype=arr.dtype, count=(hi - lo) * row // arr.itemsize,
                           offset=arr.offset + lo * row)
        return flat.reshape((hi - lo, *arr.shape[1:])).astype(np.float32, copy=False)
    return np.asarray(arr[lo:hi], dtype=np.float32)


class StoreBatches(Batches):
    """Batches of one layer of an :class:`ActivationStore`, restricted to some images."""

    def __init__(self, store: Any, layer: str, batch_size: int, seed: int = 0,
                 images: Iterable[int] | None = None, shuffle: bool = True,
                 drop_last: bool = True):
        self.store, self.layer, self.batch_size, self.seed = store, layer, batch_size, seed
        self.images = None if images is None else np.asarray(sorted(images), dtype=np.int64)
        self.shuffle, self.drop_last = shuffle, drop_last
        prov_images = np.asarray(store.provenance(layer)[:, 0])
        self.n_vectors = int(len(prov_images) if self.images is None
                             else np.isin(prov_images, self.images).sum())

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        images = None if self.images is None else self.images.tolist()
        it = self.store.iter_batches(self.layer, self.batch_size, shuffle=self.shuffle,
                                     seed=_epoch_seed(self.seed, epoch), images=images, epochs=1,
                                     drop_last=self.drop_last)
        return islice(it, start, None)  # fast-forward by reading (the store cannot seek)


class CallableBatches(Batches):
    """Wraps ``fn(epoch) -> iterable of [B, d] tensors`` (must be deterministic per epoch)."""

    def __init__(self, fn: Callable[[int], Iterable[Tensor]], n_vectors: int | None = None):
        self.fn, self.n_vectors = fn, n_vectors

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        return islice(iter(self.fn(epoch)), start, None)


def as_batches(data: Any, batch_size: int, seed: int = 0) -> Batches:
    if isinstance(data, Batches):
        return data
    if isinstance(data, (np.ndarray, Tensor)):
        return ArrayBatches(data, batch_size, seed)
    if callable(data):
        return CallableBatches(data)
    raise TypeError(f"cannot make batches from {type(data).__name__}")


def default_dead_after(n_vectors: int | None) -> int:
    """Gao et al. use 10 M tokens; on small data half an epoch without firing means dead."""
    if n_vectors is None:
        return DEFAULT_DEAD_AFTER
    return int(min(DEFAULT_DEAD_AFTER, max(n_vectors // 2, 1)))


# ---------------------------------------------------------------------------------------------
# Distributed helpers (world size 1 is the same code path).
# ---------------------------------------------------------------------------------------------
def make_adam(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Adam:
    """Fused Adam (one pass over each tensor) where this torch build has it for the device."""
    try:
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, constant, then (optionally) decay to 0 over the last ``decay_frac``."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    start = total * (1 - cfg.decay_frac)
    if cfg.decay != "none" and step >= start and total > start:
        t = (step - start) / (total - start)
        lr *= (1 - t) if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return lr


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _optim_path(out: Path, step: int) -> Path:
    return out / f"optim-step{step:09d}.safetensors"


def save_checkpoint(out: Path, sae: TopKSAE, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Optimizer file for this step first, then the weights that name the step, then cleanup:
    a kill at any point leaves a weights file whose optimizer file exists."""
    step = meta["train"]["step"]
    names = {id(p): n for n, p in sae.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{key}"] = torch.as_tensor(val).detach().clone()
    save_tensors(_optim_path(out, step), tensors, {"step": step})
    sae.save(out, meta)
    for f in out.glob("optim-step*.safetensors"):
        if f != _optim_path(out, step):
            f.unlink(missing_ok=True)


def load_optimizer_state(out: Path, step: int, sae: TopKSAE, opt: torch.optim.Optimizer,
                         require_checksum: bool = True) -> None:
    """Adam state of ``step``, checksum-verified and finite, into ``opt``."""
    path = _optim_path(out, step)
    if not path.exists():
        raise ArtifactError(f"{out}: weights of step {step} but no {path.name}; delete {out} to "
                            "train from scratch")
    tensors, meta = load_tensors(path, require_checksum=require_checksum)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ArtifactError(f"{path}: non-finite optimizer state {bad}")
    if meta.get("step") != step:
        raise RuntimeError(f"optimizer file for step {step} says step {meta.get('step')}")
    for n, p in sae.named_parameters():
        state = {key.removeprefix(n + "."): t for key, t in tensors.items()
                 if key.rsplit(".", 1)[0] == n}
        if state:
            opt.state[p] = {k: t.to(p.device) if t.dim() else t for k, t in state.items()}


# ---------------------------------------------------------------------------------------------
# Metrics and evaluation
# ---------------------------------------------------------------------------------------------
class _Window:
    """Sums over a logging window; all-reduced at log time so every rank reports global numbers."""

    def __init__(self, d: int):
        self.d = d
        self.reset()

    def reset(self) -> None:
        self.buf = torch.zeros(self.d + 7, dtype=torch.float64)
        self.t0 = time.perf_counter()

    def add(self, xs: Tensor, stats: dict[str, Tensor], loss: Tensor) -> None:
        b = self.buf
        b[:self.d] += xs.sum(0).double().cpu()
        b[self.d:] += torch.tensor([
            xs.double().pow(2).sum().item(), stats["sse"].item(), stats["nmse_sum"].item(),
            stats["l0_sum"].item(), stats["aux"].item(), xs.shape[0], loss.item()])

    def summary(self, dist: Dist, steps: int) -> dict[str, float]:
        b = dist.sum(self.buf.clone())
        sx, (sq, sse, nmse, l0, aux, n, loss) = b[:self.d], b[self.d:].tolist()
        var = sq - float(sx.pow(2).sum()) / max(n, 1)
        dt = time.perf_counter() - self.t0
        return {"fvu": sse / max(var, 1e-12), "nmse": nmse / max(n, 1), "l0": l0 / max(n, 1),
                "aux_loss": aux / max(steps, 1), "loss": loss / max(steps, 1),
                "vec_per_s": n / max(dt, 1e-9)}


@torch.no_grad()
def evaluate(sae: TopKSAE, batches: Iterable[Tensor], max_vectors: int | None = None
             ) -> dict[str, float]:
    """FVU, paper-normalised MSE and L0 over the given vectors (input units)."""
    sse = sq = nmse = l0 = n = 0.0
    sx = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    for x in batches:
        if max_vectors is not None and n >= max_vectors:
            break
        x = x.to(sae.b_pre.device).float()
        xhat, info = sae(x)
        err = (xhat - x).double().pow(2).sum(1)
        sse += float(err.sum())
        nmse += float((err / x.double().pow(2).sum(1).clamp_min(1e-12)).sum())
        sq += float(x.double().pow(2).sum())
        sx += x.double().sum(0).cpu()
        l0 += float((info["vals"] > 0).sum())
        n += x.shape[0]
    if n == 0:
        return {"n": 0}
    var = sq - float(sx.pow(2).sum()) / n
    return {"fvu": sse / max(var, 1e-12), "nmse": nmse / n, "l0": l0 / n, "n": int(n)}


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training curves (FVU, normalised MSE, L0, dead fraction, AuxK, throughput) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "step" in r and not r.get("final")]
    keys = ["fvu", "nmse", "l0", "dead_frac", "aux_loss", "vec_per_s"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in ("fvu", "nmse") and rows and min(r[key] for r in rows) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    write_atomic(png_path, lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and not json.loads(ln).get("final") and json.loads(ln)["step"] <= step]
    write_atomic(path, lambda p: p.write_text("".join(ln + "\n" for ln in keep)))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _init_sample(batches: Batches, n: int) -> Tensor:
    out, got = [], 0
    for x in batches.epoch(0):
        out.append(x.float())
        got += x.shape[0]
        if got >= n:
            break
    if not out:
        raise ValueError("no training data (fewer vectors than one batch?)")
    return torch.cat(out)[:n]


def resume_key(sae_cfg: SAEConfig, cfg: TrainConfig, meta: dict[str, Any] | None) -> str:
    """Hash of everything the trained weights depend on: a checkpoint resumes only under the
    same key (another lr, k, width, seed or store means starting clean)."""
    import hashlib

    body = {"sae": sae_cfg.to_dict(),
            "train": {k: v for k, v in asdict(cfg).items() if k not in NON_ARTIFACT_KEYS},
            "data": {k: v for k, v in (meta or {}).items() if k != "store"}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


SAE_DERIVED = ("scale", "var_total")  # fixed from the data at init, not chosen


def _settings_diff(old: dict[str, Any], sae_cfg: SAEConfig, cfg: TrainConfig,
                   meta: dict[str, Any] | None) -> list[str]:
    """Settings (``sae.*``, ``train.*``, data) in which a saved SAE's document ``old`` differs
    from the requested ones; empty when it was trained exactly so."""
    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    old_sae, old_train = old.get("sae", {}), old.get("train", {}).get("config", {})
    diff = [f"sae.{k}" for k, v in sae_cfg.to_dict().items()
            if k not in SAE_DERIVED and norm(v) != old_sae.get(k)]
    diff += [f"train.{k}" for k, v in asdict(cfg).items()
             if k not in NON_ARTIFACT_KEYS and norm(v) != old_train.get(k)]
    diff += [f"data.{k}" for k, v in (meta or {}).items()
             if k != "store" and norm(v) != old.get(k)]
    return diff


def _check_finite(sae: TopKSAE, step: int, what: str) -> None:
    bad = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(f"{what} at step {step}: parameters {bad} are not finite")


def _open_resume(out: Path, key: str, sae_cfg: SAEConfig, cfg: TrainConfig,
                 meta: dict[str, Any] | None, restart: bool, log: Callable[[str], None]
                 ) -> bool:
    """Whether ``out`` holds a checkpoint of these exact settings to resume; a checkpoint of
    other settings is discarded (``restart``) or refused, never resumed. A checkpoint of an
    older branchlens (no resume key) is kept when every recorded setting matches."""
    if not (out / "weights.safetensors").exists():
        return False
    try:
        old = load_meta(out)
    except Exception as e:  # a corrupt checkpoint is reported, never silently replaced
        raise type(e)(f"{e}; delete {out} to train from scratch") from e
    old_key = old.get("train", {}).get("resume_key")
    if old_key == key:
        return True
    diff = _settings_diff(old, sae_cfg, cfg, meta)
    if old_key is None and not diff:
        log(f"[train] {out}: written by an older branchlens with the same settings; resuming")
        return True
    why = ", ".join(diff) or "settings"
    if not restart:
        raise ValueError(f"{out} holds an SAE trained with other settings ({why}); pass "
                         "--restart to discard it, or use another output folder")
    from branchlens.pipeline import discard_dir

    discard_dir(out, log, f"settings changed ({why})")
    return False


def train_sae(data: Any, sae_cfg: SAEConfig, cfg: TrainConfig, out_dir: str | Path,
              heldout: Any = None, meta: dict[str, Any] | None = None, restart: bool = False,
              log: Callable[[str], None] = print) -> TopKSAE:
    """Train (or resume) one SAE into ``out_dir``; returns the trained model.

    ``data``: :class:`Batches`, an array, or ``fn(epoch) -> batches``. ``heldout``: vectors of
    held-out images (a :class:`Batches` or an iterable factory) for the final FVU. A checkpoint
    made under other settings is discarded when ``restart`` and refused otherwise. One process
    at a time may write ``out_dir`` (``.<name>.lock`` next to it; rank 0 holds it).
    """
    from branchlens.store import RunLock

    out = Path(out_dir)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:
        lock = RunLock(out.parent, "SAE folder", f".{out.name}.lock").acquire()
    try:
        return _train_sae(data, sae_cfg, cfg, out, heldout, meta, restart, log)
    finally:
        if lock is not None:
            lock.release()


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
    if cfg.steps is not None:
        total = cfg.steps
    elif batches.n_vectors is not None:
        total = int(cfg.epochs * (batches.n_vectors // B))
        if total < 1:
            raise ValueError(f"{cfg.epochs} epochs of {batches.n_vectors} vectors are no full "
                             f"batch of {B}: lower batch_size or give steps")
    else:
        raise ValueError("give steps when the data size is unknown")
    if cfg.warmup_steps > total:
        warnings.warn(f"warmup_steps={cfg.warmup_steps} is longer than the run ({total} steps): "
                      "the learning rate never reaches its set value", stacklevel=2)
    sae_cfg.dead_after = sae_cfg.dead_after or default_dead_after(batches.n_vectors)
    key = resume_key(sae_cfg, cfg, meta)

    resume = dist.rank == 0 and _open_resume(out, key, sae_cfg, cfg, meta, restart, log)
    resume = bool(dist.sum(torch.tensor(int(resume))).item()) if dist.on else resume
    if resume:
        sae = TopKSAE.load(out)
        tmeta = load_meta(out)["train"]
        _check_finite(sae, tmeta["step"], f"checkpoint {out / 'weights.safetensors'}")
        step, epoch, bi = tmeta["step"], tmeta["epoch"], tmeta["batch_in_epoch"]
    else:
        sae = TopKSAE(sae_cfg, seed=cfg.seed)
        sae.init_from_sample(_init_sample(batches, cfg.init_sample))
        step, epoch, bi = 0, 0, 0
    sae = sae.to(device)
    params = list(sae.parameters())
    opt = make_adam(params, cfg)
    finished = resume and step >= total and "eval" in load_meta(out)
    if resume and (not finished or _optim_path(out, step).exists()):
        load_optimizer_state(out, step, sae, opt, require_checksum="resume_key" in tmeta)
    base_meta = {**(meta or {}), "seed": cfg.seed}
    last_good = step
    metrics_path = out / "metrics.jsonl"
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _trim_metrics(metrics_path, step)
        else:
            metrics_path.unlink(missing_ok=True)

    def train_meta() -> dict:
        return {**base_meta, "train": {
            "step": step, "epoch": epoch, "batch_in_epoch": bi, "total_steps": total,
            "vectors": step * B, "n_train_vectors": batches.n_vectors,
            "dead_after": sae.cfg.dead_after, "world_size": dist.world, "config": asdict(cfg),
            "resume_key": key}}

    from branchlens.progress import progress

    window = _Window(sae.cfg.d_in)
    lo, hi = dist.rank * B // dist.world, (dist.rank + 1) * B // dist.world
    it = batches.epoch(epoch, bi)
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
            with torch.no_grad():
                fired = torch.bincount(st["idx"][st["l0_mask"]], minlength=sae.cfg.n_latents)
                fired = dist.sum(fired)
                sae.since_fired += B
                sae.since_fired[fired > 0] = 0
            window.add(x * sae.cfg.scale, st, loss.detach())
            step += 1
            if step % cfg.log_every == 0 or step == total:
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
                _check_finite(sae, step, f"training diverged (last good checkpoint: step "
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
        n_eval = cfg.eval_max_vectors
        if heldout is not None:
            hb = as_batches(heldout, B, cfg.seed)
            evals["heldout"] = evaluate(sae, hb.epoch(0), n_eval)
        evals["train"] = evaluate(sae, batches.epoch(0), n_eval)
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"final": True, "step": step, **evals}) + "\n")
        save_checkpoint(out, sae, opt, {**train_meta(), "eval": evals})
        if not cfg.keep_optimizer:  # finished: nothing resumes from it any more
            _optim_path(out, step).unlink(missing_ok=True)
        if cfg.plot:
            plot_metrics(metrics_path, out / "metrics.png")
    dist.barrier()
    sae.meta = {**train_meta(), "eval": evals}
    return sae


def train_layers(run_dir: str | Path, layers: list[str], sae_kw: dict[str, Any],
                 cfg: TrainConfig, expansion: int = 16, restart: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, TopKSAE]:
    """Train one SAE per layer from ``RUN/store`` into ``RUN/sae/<layer>/``."""
    from branchlens.store import ActivationStore, StoreError

    if expansion < 1:
        raise ValueError(f"expansion must be >= 1 (latents per input channel), got {expansion}")
    run = Path(run_dir)
    store = ActivationStore.open(run / "store")
    variant = store.manifest["variant"]
    counts = store.manifest["counts"]
    if not counts.get("images_stored", counts["images"]):
        raise StoreError(f"store {run / 'store'} holds no usable image ({counts['images']} "
                         f"given, all skipped: {store.manifest['skips']['counts']}); harvest "
                         "other images")
    missing = [x for x in layers if x not in store.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the store; it has {store.layers}")
    train_img, held_img = store.split_images(cfg.heldout_fraction, cfg.seed)
    out = {}
    for layer in layers:
        sae_cfg = SAEConfig.for_layer(variant, layer, expansion=expansion, **sae_kw)
        if sae_cfg.d_in != store.dim(layer):
            raise ValueError(f"store has d={store.dim(layer)} for {layer}, variant says "
                             f"{sae_cfg.d_in}")
        data = StoreBatches(store, layer, cfg.batch_size, cfg.seed, images=train_img)
        held = (StoreBatches(store, layer, cfg.batch_size, cfg.seed, images=held_img,
                             shuffle=False, drop_last=False) if len(held_img) else None)
        meta = {"store_hash": store.content_hash(), "store": str(run / "store"),
                "train_images": len(train_img), "heldout_images": len(held_img)}
        out[layer] = train_sae(data, sae_cfg, cfg, run / "sae" / layer, held, meta,
                               restart=restart, log=log)
    return out
