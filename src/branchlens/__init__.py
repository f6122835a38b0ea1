"""branchlens: TopK sparse autoencoders on InceptionV1 and branch specialization statistics."""

__version__ = "0.1.0"

# Activation harvest and store (the function is exported under a name that does not shadow the
# ``branchlens.harvest`` module).
from branchlens.harvest import HarvestResult, sample_positions  # noqa: E402, F401
from branchlens.harvest import harvest as harvest_activations  # noqa: E402, F401
from branchlens.store import ActivationStore, StoreError  # noqa: E402, F401

# isort: split
# Branch specialization analysis.
from branchlens.analysis import AnalysisConfig, analyze  # noqa: E402, F401

# isort: split
# Feature visualization, dataset examples and circuits.
from branchlens.circuits import attribute, branch_ablation, branch_flow  # noqa: E402, F401
from branchlens.viz import (  # noqa: E402, F401
    RenderConfig,
    receptive_field,
    top_examples,
    visualize_latents,
)

# isort: split
# TopK sparse autoencoders and their training.
from branchlens.sae import SAEConfig, TopKSAE, import_paper_checkpoint  # noqa: E402, F401
from branchlens.train import TrainConfig, train_layers, train_sae  # noqa: E402, F401
