"""What a user looks at for one image: a segmentation overlay, PCA pictures, and the raw dense map.

- ``segment_image``: the image with its label map overlaid at alpha 0.5 and a legend of the
  classes present (colours: numpy seed 42, ``randint(0, 255)`` RGB per class, as the reference
  demo, docs/reference.md). Drawn with PIL; the picture has the image's own size.
- ``features``: the raw dense map ``[h, w, D]`` float32 of one single pass on the full image
  (not normalised, not interpolated), saved with ``np.save`` (no pickle).
- ``pca_image``: the first three principal components as RGB, the teacher (sliding windows)
  left and the student (single pass) right, projected on ONE basis fitted to both.

Weights (``weights.load_models``): ``backbone`` is a name (default: the run's recipe backbone) or
a built Backbone; ``checkpoint`` is "pretrained", "best" (needs ``run``) or a file. Text features
always come from the pretrained text tower, as in evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spar_pipeline.devices import model_device
from spar_pipeline.run import Run
from spar_pipeline.weights import BEST, load_models

__all__ = ["segment_image", "features", "pca_image", "parse_classes", "class_colours", "overlay"]


# ---- public ------------------------------------------------------------------------------
def parse_classes(text: str) -> list[str]:
    """``--classes`` value -> class lines. A ``.txt`` file: one class a line (synonyms ", "-separated).
    Text with ";": classes separated by ";", synonyms by ","; otherwise every ","-separated name is a class."""
    if text.endswith(".txt") and os.path.isfile(text):
        lines = Path(text).read_text(encoding="utf-8").split("\n")
        return [ln for ln in lines if ln.strip()]
    if ";" in text:
        return [", ".join(s.strip() for s in part.split(",") if s.strip()) for part in text.split(";") if part.strip()]
    return [s.strip() for s in text.split(",") if s.strip()]


def class_colours(num_classes: int) -> np.ndarray:
    """uint8 [C, 3]: numpy seed 42, randint(0, 255) per class, as the reference demo."""
    state = np.random.get_state()
    try:
        np.random.seed(42)
        return np.random.randint(0, 255, (num_classes, 3)).astype(np.uint8)
    finally:
        np.random.set_state(state)


def segment_image(image_path: str, classes: Sequence[str], out_png: str, *, backbone=None,
                  checkpoint: str = "pretrained", run: Run | str | None = None, logit_scale: float = 40.0,
                  logit_bias: float = 0.0, prob_thd: float = 0.0, area_thd: float = 0.0,
                  resize_scale: Sequence[int] | None = None, mode: str = "single", stride: int | None = None,
                  device: str | None = None, student=None) -> dict:
    """CLI ``segment IMAGE --classes ... [--checkpoint ...] [--out PNG]``: segment one image into the
    given class lines (see ``parse_classes``; put a background class first and set ``prob_thd`` to send
    unsure pixels to it) and save the overlay with a legend. Defaults follow the reference demo: logit
    scale 40, no threshold, no resize. ``student``: the checkpoint's model already built (not built
    again). Returns {"out": path, "present": [class names shown]}."""
    from spar_pipeline.datasets import load_image, templates
    from spar_pipeline.recipe import DatasetEval
    from spar_pipeline.segment import predict

    classes = [c for c in classes if c.strip()]
    if not classes:
        raise ValueError("segment: no classes given; e.g. --classes \"background, road, car, sky\"")
    run = Run(run) if isinstance(run, str) else run
    image = load_image(image_path)
    pretrained, model = load_models(backbone, checkpoint, run, device, model=student)
    text = pretrained.class_embeddings(classes, templates())
    cfg = DatasetEval(logit_scale=logit_scale, logit_bias=logit_bias, prob_thd=prob_thd, area_thd=area_thd)
    label = predict(model, image, text, cfg, resize_scale, mode, stride)
    picture, present = overlay(image, label, [c.split(", ")[0].strip() for c in classes])
    _save_png(picture, out_png)
    return {"out": str(out_png), "present": present}


def features(image_path: str, out_npy: str, *, backbone=None, checkpoint: str = "pretrained",
             run: Run | str | None = None, resize_scale: Sequence[int] | None = None,
             device: str | None = None) -> tuple[int, ...]:
    """CLI ``features IMAGE [--checkpoint ...] --out FILE.npy``: raw dense features [h, w, D] float32 of
    one single pass on the full image (keep-ratio resized first only if ``resize_scale`` is given),
    saved with np.save (allow_pickle=False). Returns the shape."""
    from spar_pipeline.datasets import load_image
    from spar_pipeline.segment import normalise, resize_image

    run = Run(run) if isinstance(run, str) else run
    _, model = load_models(backbone, checkpoint, run, device, need_pretrained=False)
    x = normalise(model, resize_image(load_image(image_path), resize_scale))
    with torch.no_grad():
        arr = model.dense(x)[0].float().cpu().numpy().astype(np.float32)
    Path(out_npy).parent.mkdir(parents=True, exist_ok=True)
    with open(out_npy, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return tuple(arr.shape)


def pca_image(image_path: str, out_png: str, *, backbone=None, run: Run | str | None = None,
              checkpoint: str | None = None, stride: int | None = None, resize_scale: Sequence[int] | None = None,
              device: str | None = None, student=None) -> dict:
    """CLI ``pca IMAGE [--run RUN] [--checkpoint ...] --out PNG``: first three principal components as
    RGB, teacher (pretrained, sliding windows of K at ``stride``) left and student (single pass; the
    run's best checkpoint when it exists, else the given or pretrained weights) right, on one shared
    basis. The image is resized keeping its ratio when ``resize_scale`` is given, then to multiples of
    the patch size. The PNG is 2·W × H of that image. ``student``: the checkpoint's model already
    built (not built again). Returns {"out", "student", "size"}."""
    from spar_pipeline.datasets import load_image
    from spar_pipeline.segment import normalise, resize_image
    from spar_pipeline.windows import sliding_features

    run = Run(run) if isinstance(run, str) else run
    if stride is None:  # the run's teacher stride, else the paper's 24
        stride = run.recipe.extract.stride if run is not None else 24
    if checkpoint is None:
        checkpoint = "best" if run is not None and run.exists(*BEST) else "pretrained"
    teacher_model, student_model = load_models(backbone, checkpoint, run, device, model=student)
    P = teacher_model.patch_size
    image = _snap(resize_image(load_image(image_path), resize_scale), P)
    x = normalise(teacher_model, image)
    with torch.no_grad():
        teacher = sliding_features(teacher_model, x, window=teacher_model.window, stride=stride).float()
        student = student_model.dense(x.to(model_device(student_model)))[0].float().to(teacher.device)
    if student.shape != teacher.shape:
        raise ValueError(f"pca: student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ")
    rgb_t, rgb_s = _shared_pca(teacher, student)
    H, W = image.shape[:2]
    picture = np.concatenate([_upscale(rgb_t, H, W), _upscale(rgb_s, H, W)], axis=1)
    picture = _caption(picture, [(0, f"teacher: sliding s={stride}"), (W, f"student: single pass ({checkpoint})")])
    _save_png(picture, out_png)
    return {"out": str(out_png), "student": checkpoint, "size": (2 * W, H)}


def overlay(image: np.ndarray, label: np.ndarray, names: Sequence[str], alpha: float = 0.5,
            font_size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """uint8 [H, W, 3]: the image blended with class colours at ``alpha``, plus a legend (upper right)
    of the classes present (28 px ≈ the demo's fontsize 20 at 100 dpi; smaller on small images so the
    legend never hides them). Returns (picture, names present)."""
    from PIL import Image, ImageDraw

    if font_size is None:
        present_n = max(1, len(np.unique(label)))
        font_size = int(max(8, min(28, image.shape[0] // (3 * present_n), image.shape[1] // 14)))

    colours = class_colours(len(names))
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colours[label].astype(np.float32)
    im = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))
    present = [int(c) for c in np.unique(label)]
    draw = ImageDraw.Draw(im)
    font = _font(font_size)
    pad, box = 4, font_size
    widths = [draw.textbbox((0, 0), names[c], font=font)[2] for c in present]
    legend_w = box + 3 * pad + max(widths, default=0)
    x0 = max(0, im.width - legend_w - pad)
    draw.rectangle([x0, pad, x0 + legend_w, pad + len(present) * (box + pad) + pad], fill=(255, 255, 255))
    for i, c in enumerate(present):
        y = pad + pad + i * (box + pad)
        draw.rectangle([x0 + pad, y, x0 + pad + box, y + box], fill=tuple(int(v) for v in colours[c]))
        draw.text((x0 + 2 * pad + box, y), names[c], fill=(0, 0, 0), font=font)
    return np.asarray(im), [names[c] for c in present]


# ---- helpers -----------------------------------------------------------------------------
def _snap(image: np.ndarray, patch: int) -> np.ndarray:
    """Resize (cv2 bilinear) to the nearest multiples of the patch size (at least one patch)."""
    import cv2

    h, w = image.shape[:2]
    nh, nw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
    return image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)


def _shared_pca(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Both [h, w, D] -> [h, w, 3] in [0, 1]: top-3 principal axes of the pooled features, scaled per
    component by the pooled 1st–99th percentiles."""
    h, w, D = a.shape
    pooled = torch.cat([a.reshape(-1, D), b.reshape(-1, D)]).double()
    centred = pooled - pooled.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(3, vh.shape[0])
    proj = centred @ vh[:k].T
    if k < 3:
        proj = torch.cat([proj, torch.zeros(proj.shape[0], 3 - k, dtype=proj.dtype)], dim=1)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).float().cpu().numpy()
    n = h * w
    return rgb[:n].reshape(h, w, 3), rgb[n:].reshape(h, w, 3)


def _upscale(rgb: np.ndarray, H: int, W: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))
    return np.asarray(im.resize((W, H), Image.NEAREST))


def _caption(picture: np.ndarray, labels: list[tuple[int, str]]) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(picture)
    draw = ImageDraw.Draw(im)
    font = _font(max(10, min(20, picture.shape[0] // 16)))
    for x, text in labels:
        box = draw.textbbox((x + 4, 4), text, font=font)
        draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
        draw.text((x + 4, 4), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _save_png(picture: np.ndarray, out_png: str) -> None:
    from PIL import Image

    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(picture)).save(out_png, format="PNG")
