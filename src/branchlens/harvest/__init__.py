"""Harvest activations of many layers in one forward pass into an activation store.

A library: ``collect`` runs a network over an opened image source (once per batch, stopping at
the deepest requested layer; split across ranks under torchrun) and writes shards; ``sampling``
decides which positions of each image are stored; ``fingerprint`` records the source's files.
The harvest stage (a source spec, weights, a run folder) is :mod:`branchlens.stages.harvest`;
``harvest`` here re-exports it for one release.
"""

from __future__ import annotations

from branchlens.harvest.collect import (
    DEFAULT_LAYERS,
    HarvestResult,
    check_settings,
    collect,
    image_count,
    layer_shapes,
    parse_layers,
)
from branchlens.harvest.sampling import (
    FP16_OVERFLOW,
    NON_FINITE,
    SAMPLING_METHODS,
    cap_samples,
    image_rng,
    sample_batch,
    sample_positions,
    sampling_groups,
)

__all__ = [
    "DEFAULT_LAYERS", "FP16_OVERFLOW", "NON_FINITE", "SAMPLING_METHODS", "HarvestResult",
    "cap_samples", "check_settings", "collect", "harvest", "image_count", "image_rng",
    "layer_shapes", "parse_layers", "sample_batch", "sample_positions", "sampling_groups",
]


def __getattr__(name: str):
    if name == "harvest":  # lazy: the stage imports this package
        from branchlens.stages.harvest import harvest  # moved; kept for one release

        return harvest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
