"""What ``spar-pipeline run`` shows at the end, from one held-out image the student never saw.

- speed: forward seconds of the student single pass against the sliding-window teacher at the
  recipe's strides, timed as the paper does (``timing``: only the ViT forward passes of one
  1024×2048 image, the recipe's warm-up passes, then one timed);
- pictures: the PCA picture (teacher left, student right, one basis) and a segmentation overlay,
  written to ``RUN/reports/`` (uploaded there for object-store runs).

Done again on every call: it is cheap next to the stages, and it must reflect the newest student.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from spar_pipeline.run import Run

__all__ = ["held_out_look", "DEMO_CLASSES"]

log = logging.getLogger(__name__)

# Demo classes for the overlay (background first): readable names, not a benchmark.
DEMO_CLASSES = ["background", "sky", "tree", "road", "building", "person", "car", "water"]


def held_out_look(run: Run, *, classes: list[str] | None = None) -> dict[str, Any]:
    """{"image_id", "size", "checkpoint", "seconds": {mode: forward s}, "forward_size", "pictures": {name: url}}."""
    from spar_pipeline import augmentation, evaluate, pictures, weights
    from spar_pipeline.timing import PAPER_SIZE, forward_seconds
    from spar_pipeline.train import plan

    recipe = run.recipe
    _, held_out = plan(run)
    if not held_out:
        return {}
    image_id = held_out[0].image_id
    image = augmentation.augmented_image(run, image_id).permute(1, 2, 0).numpy()  # uint8 [H, W, 3]
    checkpoint = "best" if run.exists(*evaluate.BEST) else "pretrained"
    teacher, student = weights.load_models(None, checkpoint, run)

    timed = dict(size=PAPER_SIZE, warmup=recipe.evaluate.timing_warmup, window_batch=recipe.evaluate.window_batch)
    seconds = {"single (student)": forward_seconds(student, "single", **timed)}
    for stride in dict.fromkeys([recipe.extract.stride, *recipe.evaluate.strides]):
        seconds[f"sliding s={stride} (teacher)"] = forward_seconds(teacher, "sliding", stride, **timed)

    pictures = {}
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp, "image.png")
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(image)).save(png)
        outs = {"pca": Path(tmp, f"pca_{image_id}.png"), "segmentation": Path(tmp, f"segmentation_{image_id}.png")}
        pictures.pca_image(str(png), str(outs["pca"]), backbone=teacher, run=run, checkpoint=checkpoint,
                        stride=recipe.extract.stride, student=student)
        pictures.segment_image(str(png), classes or DEMO_CLASSES, str(outs["segmentation"]), backbone=teacher,
                            checkpoint=checkpoint, run=run, prob_thd=0.0, student=student)
        for name, out in outs.items():
            run.write_bytes_atomic(out.read_bytes(), "reports", out.name)
            pictures[name] = run.url_for("reports", out.name)
    log.info("held-out image %d (%dx%d); forward seconds at %d×%d: %s", image_id, image.shape[1], image.shape[0],
             *PAPER_SIZE, ", ".join(f"{k} {v:.4f} s" for k, v in seconds.items()))
    return {"image_id": image_id, "size": (int(image.shape[1]), int(image.shape[0])), "checkpoint": checkpoint,
            "seconds": seconds, "forward_size": PAPER_SIZE, "pictures": pictures}
