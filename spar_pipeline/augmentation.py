"""Each image's augmentation: drawn once as the reference draws it, applied the same everywhere.

The draw is a pure function of (recipe seed, image id) through a counter-based generator
(Philox), so it does not depend on order, worker count or machine. It needs only the source
size, so drawing decodes nothing; :func:`augmented_from_rows` applies a recorded draw and is
the one function the augment, extract and train stages (and evaluate, the pictures) call for
pixels.

Rules (mmcv/mmseg semantics, docs/reference.md): RandomResize with keep_ratio; then upscale a
short side below ``min_side``, or with probability 1 − prob_crop squash to multiples of
``snap``, or crop each side to U[frac·L, L] (≥ min_side, snapped) at a uniform position; flip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from spar_pipeline import manifest
from spar_pipeline.fsutil import redact
from spar_pipeline.recipe import AugmentConfig
from spar_pipeline.run import Run

__all__ = ["Draw", "draw", "apply", "draw_of", "augment_row", "augmented_from_rows", "augmented_image"]


@dataclass(frozen=True)
class Draw:
    src_height: int
    src_width: int
    resized_height: int
    resized_width: int
    mode: str  # upscale | full | crop
    crop_top: int
    crop_left: int
    crop_height: int
    crop_width: int
    flip: bool
    height: int
    width: int


def _rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=np.array([seed, image_id], dtype=np.uint64)))


def _snap(v: int, snap: int) -> int:
    return (v // snap) * snap


def draw(seed: int, image_id: int, src_h: int, src_w: int, cfg: AugmentConfig) -> Draw:
    """The augmentation of one image, a pure function of (seed, image id) and its source size.

    Raises ValueError when the size cannot be augmented (a side that rounds to 0 pixels).
    """
    if src_h < 1 or src_w < 1:
        raise ValueError(f"source size {src_w}×{src_h} is empty")
    rng = _rng(seed, image_id)
    # (1) mmcv RandomResize(scale, ratio_range, keep_ratio=True): rescale_size + _scale_size
    r = rng.uniform(cfg.ratio_range[0], cfg.ratio_range[1])
    target = (int(cfg.scale[0] * r), int(cfg.scale[1] * r))
    s = min(max(target) / max(src_h, src_w), min(target) / min(src_h, src_w))
    w, h = int(src_w * s + 0.5), int(src_h * s + 0.5)
    short = min(h, w)
    if short < 1:
        raise ValueError(f"source size {src_w}×{src_h} resizes to {w}×{h} (scale {s:.4g}); aspect ratio too extreme")
    # (2) RandomCropOrFullImage
    top = left = 0
    ch, cw = h, w
    if short < cfg.min_side:  # (a) upscale the short side to min_side, no crop
        mode = "upscale"
        scale = cfg.min_side / short  # the scale first, as the reference: w·(512/short) ≠ w·512/short in float
        out_w = _snap(max(int(w * scale), cfg.min_side), cfg.snap)
        out_h = _snap(max(int(h * scale), cfg.min_side), cfg.snap)
    elif rng.random() > cfg.prob_crop:  # (b) full image, squashed to multiples of snap
        mode = "full"
        out_w, out_h = _snap(w, cfg.snap), _snap(h, cfg.snap)
    else:  # (c) crop sides ~ randint(floor(frac·L), L) inclusive, ≥ min_side, snapped; mmseg RandomCrop offsets
        mode = "crop"
        ch = _snap(max(int(rng.integers(math.floor(cfg.crop_min_frac * h), h, endpoint=True)), cfg.min_side),
                   cfg.snap)
        cw = _snap(max(int(rng.integers(math.floor(cfg.crop_min_frac * w), w, endpoint=True)), cfg.min_side),
                   cfg.snap)
        top = int(rng.integers(0, max(h - ch, 0), endpoint=True))
        left = int(rng.integers(0, max(w - cw, 0), endpoint=True))
        out_h, out_w = ch, cw
    # (3) horizontal flip of the final image
    flip = bool(rng.random() < cfg.prob_flip)
    return Draw(src_h, src_w, h, w, mode, top, left, ch, cw, flip, out_h, out_w)


def apply(image: np.ndarray, d: Draw) -> torch.Tensor:
    """uint8 [3, height, width] from uint8 RGB [H, W, 3], with cv2 bilinear resizes as mmcv does."""
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"apply() takes uint8 RGB [H, W, 3], got {image.dtype} {list(image.shape)}")
    if image.shape[:2] != (d.src_height, d.src_width):
        raise ValueError(f"image is {image.shape[1]}×{image.shape[0]}, "
                         f"the draw was made for {d.src_width}×{d.src_height}")
    img = cv2.resize(image, (d.resized_width, d.resized_height), interpolation=cv2.INTER_LINEAR)
    img = img[d.crop_top:d.crop_top + d.crop_height, d.crop_left:d.crop_left + d.crop_width]
    if img.shape[:2] != (d.height, d.width):
        img = cv2.resize(img, (d.width, d.height), interpolation=cv2.INTER_LINEAR)
    if d.flip:
        img = img[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def draw_of(row: dict[str, Any]) -> Draw:
    """The draw an augment manifest row records."""
    return Draw(**{k: row[k] for k in Draw.__dataclass_fields__})


def _row(image_id: int, d: Draw | None, reason: str = "") -> dict:
    if d is None:
        zeros = {k: (False if k == "flip" else "" if k == "mode" else 0) for k in Draw.__dataclass_fields__}
        return dict(image_id=image_id, status="rejected", reason=reason, **zeros)
    return dict(image_id=image_id, status="ok", reason="", **asdict(d))


def augment_row(seed: int, cfg: AugmentConfig, max_pixels: int, ingest_row: dict) -> dict:
    """The augment manifest row of one ingest row: the draw, or a rejection with its reason."""
    image_id = ingest_row["image_id"]
    try:
        d = draw(seed, image_id, ingest_row["height"], ingest_row["width"], cfg)
    except ValueError as e:
        return _row(image_id, None, str(e))
    if d.height * d.width > max_pixels:  # only extreme aspect ratios get here, through the upscale branch
        return _row(image_id, None, f"augmented size {d.width}×{d.height} exceeds the pixel limit {max_pixels}")
    return _row(image_id, d)


def augmented_from_rows(ingest_row: dict, augment_row: dict, max_pixels: int,
                        storage_options: dict | None = None) -> torch.Tensor:
    """Pixels of one image from its manifest rows: one byte-range read, decode, apply."""
    from spar_pipeline.imageio import decode_image
    from spar_pipeline.sources import read_member

    data = read_member(ingest_row["source"], ingest_row["offset"], ingest_row["size"], storage_options)
    return apply(decode_image(data, max_pixels), draw_of(augment_row))


_ROWS: dict[str, tuple[dict, dict]] = {}


def augmented_image(run: Run | str, image_id: int) -> torch.Tensor:
    """THE pixels of an augmented image, identical in every process and on every machine."""
    run = Run(run) if isinstance(run, str) else run
    cached = _ROWS.get(run.url)
    if cached is None or image_id not in cached[0] or image_id not in cached[1]:
        cached = ({r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()},
                  {r["image_id"]: r for r in manifest.read_manifest(run, "augment").to_pylist()})
        _ROWS[run.url] = cached
    ingest_rows, augment_rows = cached
    if image_id not in augment_rows or augment_rows[image_id]["status"] != "ok":
        raise KeyError(f"image {image_id}: no ok augment row in {redact(run.url)}")
    return augmented_from_rows(ingest_rows[image_id], augment_rows[image_id], run.recipe.ingest.max_pixels,
                               run.storage_options)
