"""Training settings (``train.*``): :class:`TrainConfig` is the ``train`` block of
:mod:`branchlens.settings` (its defaults and checks are written there, once); this module
re-exports it for the training code and adds the error a diverged training raises."""

from __future__ import annotations

from branchlens.settings import DECAYS, NON_ARTIFACT, TrainConfig

__all__ = ["DECAYS", "NON_ARTIFACT_KEYS", "NonFiniteLossError", "TrainConfig"]

NON_ARTIFACT_KEYS = NON_ARTIFACT["train"]  # out of the resume key (and of the stage hash)


class NonFiniteLossError(RuntimeError):
    """Training diverged; the last good checkpoint is kept on disk."""
