"""Segmentation metric: mIoU over a whole dataset, as torchmetrics ``JaccardIndex`` (macro) computes it.

One confusion matrix is accumulated over every image; per-class IoU = TP / (TP + FP + FN). A
class absent from both prediction and ground truth over the whole set is left out of the mean
(its IoU is nan); a class predicted but never in the ground truth counts as 0. Pixels whose
target is ``ignore_index`` (255) are dropped (docs/reference.md, "Evaluation", Metric).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["SegMetric"]


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().to("cpu").numpy()
    return np.asarray(a)


class SegMetric:
    """Accumulate ``update(pred, target)`` over a dataset, then ``compute()`` mIoU × 100."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"SegMetric: num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [target, pred]

    def update(self, pred: Any, target: Any) -> None:
        """``pred`` and ``target``: integer maps of the same shape (torch or numpy, any shape)."""
        p, t = _as_numpy(pred).astype(np.int64).ravel(), _as_numpy(target).astype(np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"SegMetric.update: prediction has {p.size} pixels, target {t.size}")
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        C = self.num_classes
        bad = (t < 0) | (t >= C)
        if bad.any():
            raise ValueError(f"SegMetric.update: target values {sorted(set(t[bad].tolist()))[:5]} outside "
                             f"0..{C - 1} (and not ignore_index {self.ignore_index})")
        if ((p < 0) | (p >= C)).any():
            raise ValueError(f"SegMetric.update: predicted classes outside 0..{C - 1}")
        self.confusion += np.bincount(t * C + p, minlength=C * C).reshape(C, C)

    def compute(self) -> dict[str, Any]:
        """``{"miou": float in [0, 100], "iou": per-class IoU × 100 (nan = absent everywhere)}``."""
        cm = self.confusion
        tp = np.diag(cm).astype(np.float64)
        union = cm.sum(0) + cm.sum(1) - np.diag(cm)  # TP + FP + FN
        iou = [float(100.0 * tp[c] / union[c]) if union[c] > 0 else math.nan for c in range(self.num_classes)]
        present = [v for v in iou if not math.isnan(v)]
        miou = float(np.mean(present)) if present else math.nan
        return {"miou": miou, "iou": iou}
