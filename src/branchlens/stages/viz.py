"""The visualize, examples and circuits stages, re-exported from their modules
(``stages/visualize.py``, ``examples.py``, ``circuits.py``; the shared inputs in
``stages/vizinputs.py``): kept for one release."""

from branchlens.run import ProvenanceError
from branchlens.stages.circuits import circuits_stage
from branchlens.stages.examples import examples_stage
from branchlens.stages.visualize import visualize_stage
from branchlens.stages.vizinputs import (
    check_sae_store,
    dominant_for,
    load_network,
    load_sae,
    pick_latents,
    run_source,
    store_provenance,
)

_model = load_network  # the old name (tests/test_faults.py), kept for one release

__all__ = ["ProvenanceError", "check_sae_store", "circuits_stage", "dominant_for",
           "examples_stage", "load_network", "load_sae", "pick_latents", "run_source",
           "store_provenance", "visualize_stage"]
