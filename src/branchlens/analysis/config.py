"""The ``analyze`` block: :class:`AnalysisConfig` is defined, with every default and check,
in :mod:`branchlens.settings` (the ground floor, so the CLI reads it without the analysis) and
re-exported here for the analysis. :class:`AnalysisError` is what a run that cannot be analysed
as it is raises (the message names the layer and the command to run).
"""

from __future__ import annotations

from branchlens.settings import AnalysisConfig

__all__ = ["AnalysisConfig", "AnalysisError"]


class AnalysisError(ValueError):
    """A run cannot be analysed as it is; the message names the layer and what to run."""
