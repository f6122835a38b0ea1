"""branchlens: TopK sparse autoencoders on InceptionV1 and branch specialization statistics."""

__version__ = "0.1.0"

# isort: split
# Branch specialization analysis.
from branchlens.analysis import AnalysisConfig, analyze  # noqa: E402, F401
