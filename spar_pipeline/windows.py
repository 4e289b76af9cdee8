"""The sliding-window teacher: windows of K at stride s, stitched on an r× sub-patch canvas.

Rule (docs/reference.md, "Teacher: windows and stitching"): starts 0, s, 2s, … ≤ L−K plus
L−K; r = P / gcd(P, s) so every start lands on the 1/r-patch grid; each window's K/P × K/P
map is bilinearly upsampled ×r (align_corners False), summed into a float32 canvas of rH/P ×
rW/P with counts, averaged, then resized bilinearly to H/P × W/P. A side shorter than K gets
one window of that side's length.
Windows of several images may share a forward batch (the extract stage feeds it that way).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from spar_pipeline.errors import OptionError

__all__ = ["window_starts", "upsample_factor", "Canvas", "sliding_features", "sliding_features_many", "count_windows",
           "upsample"]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= 0 or window <= 0 or stride <= 0:
        raise ValueError(f"window_starts: length, window and stride must be ≥ 1 (got {length}, {window}, {stride})")
    k = min(window, length)
    starts = list(range(0, length - k + 1, stride))
    if starts[-1] != length - k:
        starts.append(length - k)
    return starts


def upsample_factor(patch: int, stride: int) -> int:
    """Smallest r dividing P with the stride on the P/r grid (s=24, P=16 → 2; s=16 or 256 → 1)."""
    return patch // math.gcd(patch, stride)


def upsample(maps: torch.Tensor, r: int) -> torch.Tensor:
    """[N, C, h, w] -> float32 [N, C, rh, rw], bilinear, align_corners False (identity for r = 1)."""
    maps = maps.float()
    return F.interpolate(maps, scale_factor=r, mode="bilinear", align_corners=False) if r > 1 else maps


def count_windows(height: int, width: int, window: int, stride: int) -> int:
    return len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))


class Canvas:
    """Sum and count of upsampled window maps for one image, in float32 whatever the model ran in."""

    def __init__(self, height: int, width: int, patch: int, stride: int, dim: int, device: torch.device):
        if height % patch or width % patch:
            raise ValueError(f"image {height}×{width} is not a multiple of the patch size {patch}")
        self.h, self.w, self.patch = height // patch, width // patch, patch
        self.r = upsample_factor(patch, stride)
        self.sum = torch.zeros(dim, self.h * self.r, self.w * self.r, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, self.h * self.r, self.w * self.r, dtype=torch.float32, device=device)

    def add(self, fmap: torch.Tensor, top: int, left: int) -> None:
        """``fmap``: [C, k/P, k/P] channel-first map of the window starting at pixel (top, left)."""
        self.add_upsampled(upsample(fmap[None], self.r)[0], top, left)

    def add_upsampled(self, fmap: torch.Tensor, top: int, left: int) -> None:
        """``fmap``: [C, rk/P, rk/P], already upsampled ×r (batched callers upsample once per batch)."""
        y, x = top * self.r // self.patch, left * self.r // self.patch
        fh, fw = fmap.shape[-2:]
        self.sum[:, y:y + fh, x:x + fw] += fmap
        self.count[:, y:y + fh, x:x + fw] += 1

    def result(self) -> torch.Tensor:
        """[H/P, W/P, C] float32."""
        avg = (self.sum / self.count.clamp_min(1))[None]
        if self.r > 1:
            avg = F.interpolate(avg, size=(self.h, self.w), mode="bilinear", align_corners=False)
        return avg[0].permute(1, 2, 0).contiguous()


def _jobs(images: Sequence[torch.Tensor], window: int, stride: int) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    for i, img in enumerate(images):
        H, W = img.shape[-2:]
        kh, kw = min(window, H), min(window, W)
        for top in window_starts(H, window, stride):
            for left in window_starts(W, window, stride):
                yield i, top, left, img[..., top:top + kh, left:left + kw]  # a view, no copy


@torch.no_grad()
def sliding_features_many(
    backbone,
    images: Sequence[torch.Tensor],
    window: int,
    stride: int,
    batch: int = 10,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Teacher maps [H/P, W/P, D] (float32) for normalised images [3, H, W], windows batched across images."""
    if not images:
        return []
    for side in {n for img in images for n in img.shape[-2:]} if stride > window else ():
        starts = window_starts(side, window, stride)
        if any(b - a > window for a, b in zip(starts, starts[1:])):
            raise OptionError(f"sliding stride {stride} > window {window} leaves pixels of a {side}-pixel side in "
                              f"no window; use a stride ≤ {window}")
    device = images[0].device
    P = backbone.patch_size
    canvases = [Canvas(img.shape[-2], img.shape[-1], P, stride, backbone.dim, device) for img in images]
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    pending: list[tuple[int, int, int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        with amp:
            feats = backbone.dense(torch.stack([v for *_, v in pending]))
        feats = upsample(feats.permute(0, 3, 1, 2), canvases[0].r)  # one resize per batch, in float32
        for (i, top, left, _), f in zip(pending, feats):
            canvases[i].add_upsampled(f, top, left)
        pending.clear()

    for job in _jobs(images, window, stride):
        if pending and (len(pending) >= batch or pending[0][3].shape != job[3].shape):
            flush()
        pending.append(job)
    flush()
    return [c.result() for c in canvases]


def sliding_features(backbone, x: torch.Tensor, window: int, stride: int, batch: int = 10,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The teacher for one image. ``x``: [1, 3, H, W] (or [3, H, W]) normalised -> [H/P, W/P, D]."""
    if x.dim() == 4 and x.shape[0] != 1:
        raise ValueError(f"sliding_features takes one image [1, 3, H, W], got {tuple(x.shape)}; "
                         "use sliding_features_many for several")
    img = x[0] if x.dim() == 4 else x
    return sliding_features_many(backbone, [img], window, stride, batch, autocast_dtype)[0]
