"""branchlens: TopK sparse autoencoders on InceptionV1 and branch specialization statistics.

The public API is re-exported here but imported lazily (PEP 562): ``import branchlens`` and
``branchlens --help`` do not pay for torch, scipy and the analysis until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from branchlens._version import __version__

# public name -> (module, attribute); the function ``harvest`` is exported as
# ``harvest_activations`` so that it does not shadow the ``branchlens.harvest`` module.
_EXPORTS: dict[str, tuple[str, str]] = {
    # a run folder and the notebook API on it
    "Run": ("branchlens.run", "Run"),
    "Latent": ("branchlens.run", "Latent"),
    "LatentTable": ("branchlens.run", "LatentTable"),
    # activation harvest and store
    "HarvestResult": ("branchlens.harvest", "HarvestResult"),
    "sample_positions": ("branchlens.harvest", "sample_positions"),
    "harvest_activations": ("branchlens.harvest", "harvest"),
    "ActivationStore": ("branchlens.store", "ActivationStore"),
    "StoreError": ("branchlens.store", "StoreError"),
    # TopK sparse autoencoders and their training
    "SAEConfig": ("branchlens.sae", "SAEConfig"),
    "TopKSAE": ("branchlens.sae", "TopKSAE"),
    "import_paper_checkpoint": ("branchlens.sae", "import_paper_checkpoint"),
    "TrainConfig": ("branchlens.train", "TrainConfig"),
    "train_layers": ("branchlens.train", "train_layers"),
    "train_sae": ("branchlens.train", "train_sae"),
    # branch specialization analysis
    "AnalysisConfig": ("branchlens.analysis", "AnalysisConfig"),
    "analyze": ("branchlens.analysis", "analyze"),
    # feature visualization, dataset examples and circuits
    "attribute": ("branchlens.viz.circuits", "attribute"),
    "branch_ablation": ("branchlens.viz.circuits", "branch_ablation"),
    "branch_flow": ("branchlens.viz.circuits", "branch_flow"),
    "RenderConfig": ("branchlens.viz", "RenderConfig"),
    "receptive_field": ("branchlens.viz", "receptive_field"),
    "top_examples": ("branchlens.viz", "top_examples"),
    "visualize_latents": ("branchlens.viz", "visualize_latents"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'branchlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
