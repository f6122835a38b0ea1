"""Training TopK SAEs: deterministic data order, metrics, atomic checkpoints, DDP.

One file per job: ``config`` (TrainConfig), ``sampling`` (the batches of each epoch),
``loop`` (train_sae: the update loop, resume, eval), ``checkpoint`` (weights + Adam state,
resume keys), ``metrics`` (logging, evaluation, plot). One SAE per layer of a run folder is the
train stage, :mod:`branchlens.stages.train` (``train_layers`` here re-exports it for one release).
"""

from __future__ import annotations

from branchlens.train.checkpoint import load_optimizer_state, resume_key, save_checkpoint
from branchlens.train.config import NON_ARTIFACT_KEYS, NonFiniteLossError, TrainConfig
from branchlens.train.loop import lr_at, make_adam, train_sae
from branchlens.train.metrics import evaluate, plot_metrics
from branchlens.train.sampling import (
    ArrayBatches,
    Batches,
    CallableBatches,
    StoreBatches,
    as_batches,
    default_dead_after,
)

__all__ = [
    "NON_ARTIFACT_KEYS", "ArrayBatches", "Batches", "CallableBatches", "NonFiniteLossError",
    "StoreBatches", "TrainConfig", "as_batches", "default_dead_after", "evaluate",
    "load_optimizer_state", "lr_at", "make_adam", "plot_metrics", "resume_key",
    "save_checkpoint", "train_layers", "train_sae",
]


def __getattr__(name: str):
    if name == "train_layers":  # lazy: the stage imports this package
        from branchlens.stages.train import train_layers  # moved; kept for one release

        return train_layers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
