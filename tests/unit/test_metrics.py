"""SegMetric against hand-computed confusion matrices (torchmetrics JaccardIndex, macro, ignore 255)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spar_pipeline.metrics import SegMetric


def test_hand_computed_with_ignore_pixels():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])  # the 0 on the ignored pixel must not count as a false positive
    m = SegMetric(3)
    m.update(pred, target)
    out = m.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1 -> 1
    assert out["iou"] == pytest.approx([50.0, 200 / 3, 100.0])
    assert out["miou"] == pytest.approx((50 + 200 / 3 + 100) / 3)


def test_absent_class_left_out_and_predicted_but_absent_counts_zero():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])  # class 2 predicted, never in the ground truth; class 3 nowhere
    m = SegMetric(4)
    m.update(pred, target)
    out = m.compute()
    assert out["iou"][:3] == pytest.approx([100.0, 50.0, 0.0])
    assert math.isnan(out["iou"][3])
    assert out["miou"] == pytest.approx(50.0)  # (100 + 50 + 0) / 3: class 3 left out, class 2 counted as 0


def test_whole_dataset_confusion_not_mean_of_images():
    m = SegMetric(2)
    m.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1: class 1 missed
    m.update(torch.tensor([[1]]), torch.tensor([[1]]))  # image 2: one correct pixel of class 1
    out = m.compute()
    # whole set: class 0 TP 3 FP 1 -> 3/4; class 1 TP 1 FN 1 -> 1/2 (per-image means would differ)
    assert out["iou"] == pytest.approx([75.0, 50.0])
    assert out["miou"] == pytest.approx(62.5)


def test_all_ignored_then_reset():
    m = SegMetric(3)
    m.update(np.zeros((2, 2), np.int64), np.full((2, 2), 255))
    assert math.isnan(m.compute()["miou"])
    m.update(np.array([1]), np.array([1]))
    assert m.compute()["miou"] == pytest.approx(100.0)
    m.reset()
    assert m.confusion.sum() == 0


def test_bad_inputs_are_named():
    m = SegMetric(3)
    with pytest.raises(ValueError, match="outside 0..2"):
        m.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="pixels"):
        m.update(np.array([0, 1]), np.array([0]))
