"""Moved to :mod:`branchlens.stages.viz`; this re-export is kept for one release."""

from branchlens.stages.viz import (  # noqa: F401  # moved; kept for one release
    ProvenanceError,
    _model,
    check_sae_store,
    circuits_stage,
    dominant_for,
    examples_stage,
    load_sae,
    pick_latents,
    run_source,
    store_provenance,
    visualize_stage,
)
