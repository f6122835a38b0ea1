"""Seeing features: batched feature visualization, top dataset examples with receptive-field
crops (``branchlens.viz.examples``); latent circuits live in :mod:`branchlens.viz.circuits`."""

from branchlens.viz.examples import TopExamples, save_examples, top_examples  # noqa: F401
from branchlens.viz.featurevis import visualize_latents  # noqa: F401
from branchlens.viz.receptive import ReceptiveField, receptive_field  # noqa: F401
from branchlens.viz.render import RenderConfig, render  # noqa: F401
