"""The open-vocabulary segmentation head shared by ``evaluate`` and the ``segment`` tool.

The reference's evaluation (docs/reference.md, "Evaluation"): keep-ratio resize (mmcv rule, cv2
bilinear), normalise, dense features, L2-normalise, cosine with the query embeddings, bilinear
(align_corners False) to the ORIGINAL image size, × logit_scale + logit_bias, softmax over all
queries, max over each class's synonyms, area threshold, argmax, probability threshold → class
0.

Sizes that are not multiples of the patch size are left to the backbone, as the reference
does: SigLIP2 zero-pads the normalised image bottom/right (ceil grid), MaskCLIP drops the
leftover pixels (floor grid), DINOv3.txt stretches. Whatever grid comes back is resized to
the target size as a whole, exactly like the reference's single pass.

Sliding mode (the reference's is broken; this is its intended behaviour): windows of K with
stride S over the resized image (``windows.window_starts`` per axis; a side shorter than K
gets one window of that side's length; a stride > K that would leave pixels in no window is an
error, as in mmseg), run in sub-batches of ``window_batch``; each
window's cosine map is bilinearly resized to the window's pixel size and summed into a
pixel-level canvas of the resized image with per-pixel counts; the average is then resized
to the original size and post-processed as in single mode.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spar_pipeline.backbones.base import Partial
from spar_pipeline.devices import model_device

__all__ = ["resize_keep_ratio", "resize_image", "normalise", "cosine_maps", "single_logits", "sliding_logits",
           "postprocess", "predict", "MODES"]

MODES = ("single", "sliding")


def resize_keep_ratio(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """(new_h, new_w) of mmcv's keep-ratio rescale: s = min(max(scale)/long, min(scale)/short),
    new side = int(side · s + 0.5). (2048, 672) on 500×375 gives 672×896 (h×w)."""
    s = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def resize_image(image: np.ndarray, scale: Sequence[int] | None) -> np.ndarray:
    """uint8 [H, W, 3] resized keeping the ratio with cv2 INTER_LINEAR (as mmcv); None: unchanged."""
    if scale is None:
        return image
    import cv2

    h, w = image.shape[:2]
    nh, nw = resize_keep_ratio(h, w, scale)
    if (nh, nw) == (h, w):
        return image
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)


def normalise(backbone, image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [1, 3, H, W], (x − 255·mean) / (255·std), on the backbone's device."""
    # np.require copies only a read-only or strided image (torch warns on a read-only array; .float() copies anyway)
    x = torch.from_numpy(np.require(image, requirements=("C", "W"))).to(model_device(backbone))
    x = x.permute(2, 0, 1)[None].float()
    return backbone.normalize(x, scale=255.0)


def cosine_maps(backbone, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """[B, 3, h, w] normalised (or a ``Partial`` pass of it) -> cosine with each query [B, Q, h/P, w/P] (the
    backbone's own grid)."""
    feats = F.normalize((backbone.finish(x) if isinstance(x, Partial) else backbone.dense(x)).float(), dim=-1)
    return torch.einsum("bhwd,qd->bqhw", feats, emb.to(feats.device, torch.float32))


@torch.no_grad()
def single_logits(backbone, x, emb: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """One pass on the whole (resized) image; cosine maps [Q, *out_size]."""
    cos = cosine_maps(backbone, x, emb)
    return F.interpolate(cos, size=out_size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def sliding_logits(backbone, x: torch.Tensor, emb: torch.Tensor, out_size: tuple[int, int], stride: int,
                   window: int | None = None, window_batch: int = 60) -> torch.Tensor:
    """Windows of K (``backbone.window``) at ``stride``, cosine maps stitched at pixel level; [Q, *out_size]."""
    from spar_pipeline.errors import OptionError
    from spar_pipeline.windows import window_starts

    if stride < 1:
        raise OptionError(f"sliding mode needs a stride ≥ 1, got {stride}")
    K = int(window or backbone.window)
    _, _, H, W = x.shape
    kh, kw = min(K, H), min(K, W)
    Q = emb.shape[0]
    canvas = torch.zeros(Q, H, W, dtype=torch.float32, device=x.device)
    count = torch.zeros(1, H, W, dtype=torch.float32, device=x.device)
    tops, lefts = window_starts(H, K, stride), window_starts(W, K, stride)
    for starts, k, side in ((tops, kh, "height"), (lefts, kw, "width")):
        if any(b - a > k for a, b in zip(starts, starts[1:])):  # mmseg asserts the same (count_mat > 0)
            raise OptionError(f"sliding stride {stride} > window {K} leaves pixels of the {side} ({H}×{W} resized "
                             f"image) in no window; use a stride ≤ {K}")
    boxes = [(t, l) for t in tops for l in lefts]
    chunk = max(1, (1 << 26) // max(1, Q * kh * kw))  # upsampled windows held at once: ≤ 256 MiB float32
    for b in range(0, len(boxes), window_batch):
        part = boxes[b:b + window_batch]
        crops = torch.stack([x[0, :, t:t + kh, l:l + kw] for t, l in part])
        cos = cosine_maps(backbone, crops, emb)
        for c in range(0, len(part), chunk):
            up = F.interpolate(cos[c:c + chunk], size=(kh, kw), mode="bilinear", align_corners=False)
            for (t, l), u in zip(part[c:c + chunk], up):
                canvas[:, t:t + kh, l:l + kw] += u
                count[:, t:t + kh, l:l + kw] += 1
    avg = canvas / count.clamp_min(1)
    if tuple(out_size) == (H, W):
        return avg
    return F.interpolate(avg[None], size=out_size, mode="bilinear", align_corners=False)[0]


def postprocess(cos: torch.Tensor, class_index: torch.Tensor, cfg) -> torch.Tensor:
    """Cosine maps [Q, H, W] -> label map [H, W] (long), with ``cfg`` a ``DatasetEval``.

    × logit_scale + logit_bias, softmax over queries, max over each class's synonyms; then
    area_thd (classes ≥ 1 whose predicted area is ≤ area_thd × the non-background predicted
    area get probability 0), argmax, and pixels whose max probability < prob_thd → class 0.
    """
    Q, H, W = cos.shape
    class_index = class_index.to(cos.device)
    num_classes = int(class_index.max()) + 1
    probs = torch.softmax(cos * float(cfg.logit_scale) + float(cfg.logit_bias), dim=0)
    if num_classes != Q:
        per_class = torch.full((num_classes, H * W), -1.0, dtype=probs.dtype, device=probs.device)
        per_class.scatter_reduce_(0, class_index[:, None].expand(Q, H * W), probs.reshape(Q, H * W), reduce="amax")
        probs = per_class.view(num_classes, H, W)
    area_thd = float(getattr(cfg, "area_thd", 0.0) or 0.0)
    if area_thd > 0:
        pred = probs.argmax(0)
        areas = torch.bincount(pred.flatten(), minlength=num_classes)
        total = areas[1:].sum()
        small = areas <= area_thd * total
        small[0] = False  # background is never suppressed
        probs = probs * (~small).to(probs.dtype)[:, None, None]
    best, pred = probs.max(0)
    prob_thd = float(getattr(cfg, "prob_thd", 0.0) or 0.0)
    if prob_thd > 0:
        pred[best < prob_thd] = 0
    return pred


@torch.no_grad()
def predict(backbone, image: np.ndarray, text: tuple[torch.Tensor, torch.Tensor], cfg,
            resize_scale: Sequence[int] | None, mode: str = "single", stride: int | None = None,
            window_batch: int = 60, prefix: Callable[[torch.Tensor], Any] | None = None) -> np.ndarray:
    """Label map int64 [H, W] at the ORIGINAL size of ``image`` (uint8 RGB [H, W, 3]).

    ``text`` = (query embeddings [Q, D] L2-normalised, class index [Q]) from
    ``backbone.class_embeddings``; ``cfg`` a ``recipe.DatasetEval``; ``resize_scale`` the
    keep-ratio (long, short) scale or None for no resize; ``mode`` "single" or "sliding"
    (with ``stride``, windows run ``window_batch`` at a time). ``prefix`` (single mode) maps the normalised
    image to the ``Partial`` pass the backbone finishes (one kept for models that share their first blocks).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    emb, class_index = text
    H, W = image.shape[:2]
    x = normalise(backbone, resize_image(image, resize_scale))
    emb = emb.to(x.device)
    if mode == "single":
        cos = single_logits(backbone, x if prefix is None else prefix(x), emb, (H, W))
    else:
        if stride is None:
            raise ValueError("sliding mode needs a stride")
        cos = sliding_logits(backbone, x, emb, (H, W), stride, window_batch=window_batch)
    return postprocess(cos, class_index, cfg).cpu().numpy().astype(np.int64)
