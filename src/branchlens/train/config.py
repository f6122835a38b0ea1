"""Training settings (``train.*``): validated on construction, shared by CLI, pipeline and API."""

from __future__ import annotations

import math
from dataclasses import dataclass

from branchlens.config import NON_ARTIFACT, check_seed

DECAYS = ("none", "linear", "cosine")
NON_ARTIFACT_KEYS = NON_ARTIFACT["train"]  # out of the resume key (and of the stage hash)


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
    threads: int | None = None  # torch threads; None: OMP_NUM_THREADS, else the usable cores

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
        check_seed(self.seed)
        _require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _require(self.ckpt_every >= 1, f"ckpt_every must be >= 1, got {self.ckpt_every}")
        _require(self.init_sample >= 1, f"init_sample must be >= 1, got {self.init_sample}")
        _require(0 <= self.heldout_fraction < 1,
                 f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        _require(self.eval_max_vectors >= 1,
                 f"eval_max_vectors must be >= 1, got {self.eval_max_vectors}")
        _require(self.threads is None or self.threads >= 1,
                 f"threads must be >= 1 (or None: the usable cores), got {self.threads}")
