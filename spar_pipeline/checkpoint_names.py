"""The file names of a student's best epoch, in one place: ``checkpoint`` writes them, ``run``
(``StudentFolder.best_weights``), ``weights``, ``api`` and the CLI read them. A module of its own
because ``checkpoint`` imports ``run``, so ``run`` cannot import them from ``checkpoint``."""

from __future__ import annotations

__all__ = ["BEST", "BEST_OPEN_CLIP", "BEST_INFO"]

BEST = "best.safetensors"  # the whole backbone, for build(name, checkpoint=...)
BEST_OPEN_CLIP = "best_open_clip.safetensors"  # open_clip families: the wrapped model in open_clip's key layout
BEST_INFO = "best.json"  # which epoch, its val_mse; written last
