"""spar-pipeline: distil a sliding-window ViT teacher into a single-pass student (SPAR)."""

__version__ = "0.1.0"
