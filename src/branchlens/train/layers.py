"""Moved to :mod:`branchlens.stages.train`; this re-export is kept for one release."""

from branchlens.stages.train import train_layers  # noqa: F401  # moved; kept for one release
