"""Held-out teacher MSE: how far a model's single pass is from a teacher's stored maps, on the images ``train``
holds out (``evaluate --run RUN`` without a dataset).

Why apart from ``evaluate``: it reads the run's own store and augmented images, not a benchmark, and scores
features, not segmentation; the bench scripts call ``feature_mse`` directly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from spar_pipeline.devices import model_device
from spar_pipeline.errors import EvaluateError
from spar_pipeline.run import Run

__all__ = ["heldout_mse", "feature_mse"]


@torch.no_grad()
def heldout_mse(run: Run, checkpoints: Sequence[str], backbone: str | None = None) -> Iterator[tuple[str, float]]:
    """``evaluate --run RUN`` without datasets: (checkpoint, held-out teacher MSE) for each of
    ``checkpoints`` (pretrained, best or a weights file), one at a time."""
    from spar_pipeline.weights import load_models

    students = set(run.students())
    for ck in checkpoints:
        _, model = load_models(backbone, ck, run, need_pretrained=False)
        # a student is compared with the teacher it learned; pretrained and files with the default teacher
        teacher = (run.student(ck).settings or {}).get("teacher", "default") if ck in students else "default"
        yield ck, feature_mse(model, run, teacher=teacher)


@torch.no_grad()
def feature_mse(backbone, run: Run | str, image_ids: Sequence[int] | None = None, device=None,
                teacher: str = "default") -> float:
    """Held-out teacher MSE: mean over ``image_ids`` (default: the held-out slice that ``train`` never
    trains on and validates with) of the MSE between ``backbone``'s single-pass dense map of the
    augmented image and teacher ``teacher``'s stored map, over all h·w·D elements (the training loss)."""
    from spar_pipeline.augmentation import augmented_image
    from spar_pipeline.store import FeatureStore
    from spar_pipeline.errors import TrainError
    from spar_pipeline.split import training_items

    run = Run(run) if isinstance(run, str) else run
    if image_ids is None:
        try:
            image_ids = [it.image_id for it in training_items(run, teacher)[1]]
        except TrainError as e:
            raise EvaluateError(str(e)) from None
        if not image_ids:
            raise EvaluateError(f"{run}: no held-out images ([train].holdout_fraction = 0); evaluate on a "
                                "benchmark with --dataset NAME=PATH instead")
    if not image_ids:
        raise EvaluateError(f"{run}: no extracted images to compare with; run `spar-pipeline extract` first")
    store = FeatureStore.open(run.teacher(teacher).store_url, storage_options=run.storage_options)
    dev = torch.device(device) if device is not None else model_device(backbone)
    total = 0.0
    for image_id in image_ids:
        x = augmented_image(run, int(image_id)).to(dev)[None].float() / 255.0
        student = backbone.dense(backbone.normalize(x))[0].float()
        teacher = torch.from_numpy(np.asarray(store.read(int(image_id)), dtype=np.float32)).to(dev)
        if student.shape != teacher.shape:
            raise EvaluateError(f"image {image_id}: student map {tuple(student.shape)} vs teacher "
                                f"{tuple(teacher.shape)}; is this the run's backbone?")
        total += float(torch.mean((student - teacher) ** 2))
    return total / len(image_ids)
