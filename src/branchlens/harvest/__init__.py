"""Harvest activations of many layers in one forward pass into an activation store.

``collect`` runs the network over the images (once per batch, stopping at the deepest requested
layer; split across ranks under torchrun) and writes shards; ``sampling`` decides which
positions of each image are stored.
"""

from __future__ import annotations

from branchlens.harvest.collect import (
    DEFAULT_LAYERS,
    HarvestResult,
    harvest,
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
    "cap_samples", "harvest", "image_rng", "layer_shapes", "parse_layers", "sample_batch",
    "sample_positions", "sampling_groups",
]
