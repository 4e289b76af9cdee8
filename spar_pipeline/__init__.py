"""spar-pipeline: distil a sliding-window ViT teacher into a single-pass student (SPAR)."""

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(source, *, backbone=None, device=None):
    """A SPAR student (or backbone) ready to use: an exported folder, ``RUN`` or ``RUN:STUDENT``,
    ``hf-hub:ORG/NAME``, a weights file with ``backbone=NAME``, or a backbone name. Returns the
    Backbone (``dense``, ``encode_text``, ``class_embeddings``) with ``features(image)`` and
    ``segment(image, classes)``. See ``spar_pipeline.api``."""
    from spar_pipeline.api import load as _load  # torch and the backbones only when asked for

    return _load(source, backbone=backbone, device=device)
