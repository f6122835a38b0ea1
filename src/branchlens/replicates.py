"""Moved to :mod:`branchlens.stages.stability`; this re-export is kept for one release."""

from branchlens.stages.stability import (  # noqa: F401  # moved; kept for one release
    MIN_REPLICATES,
    StabilityError,
    format_stability,
    stability,
)
