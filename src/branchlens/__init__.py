"""branchlens: TopK sparse autoencoders on InceptionV1 and branch specialization statistics."""

__version__ = "0.1.0"
