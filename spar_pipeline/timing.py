"""Inference timing as the paper measures it: the ViT forward passes only, of one 1024×2048 image.

One protocol for every speed figure (``evaluate`` rows, the run summary, ``python -m bench
inference``): a *pass* is what one image costs the backbone's ``dense`` forward —

- single: one forward on the whole image;
- sliding: windows of K (``backbone.window``) at the stride (``windows.window_starts`` per axis),
  run in sub-batches of ``window_batch`` (the paper: 60); the pass is the SUM of the sub-batches'
  forward times. Cutting and stacking the windows, upsampling, stitching, the text similarity and
  post-processing are not timed.

``warmup`` passes run first and the next one is timed (the paper: 10, the 11th timed), on a
1024×2048 image (the paper's Fig. 1) unless ``size`` says otherwise: callers pass the recipe's
``[evaluate] timing_size``, the paper's size in its presets and that size scaled as the window in
the small CPU worlds (``mini``, ``tiny-cpu``: 128×256 at K = 64, where a 1024×2048 pass is 8192
tokens of global attention and ~30,000 windows at stride 8, minutes on a CPU). The image is a fixed random
normalised tensor: a ViT's cost does not depend on the pixel values. The device is the backbone's,
synchronised around every timed forward; precision is the model's own (float32, as evaluation).
What a whole ``segment.predict`` costs end to end is a different figure (evaluate's ``predict_seconds``).

``max_batches`` (for benchmarks on slow machines only) times just the first sub-batches of each
pass and scales the sum to all windows; the result then says ``projected``.

The cost of a forward depends on the architecture and the device, not on the weights, so a
process measures each (backbone name, device, mode, stride, size, warm-up, sub-batch) once and
reuses it (a student and its pretrained backbone share one figure); ``fresh=True`` measures again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from spar_pipeline.devices import model_device

__all__ = ["PAPER_SIZE", "PAPER_WARMUP", "PAPER_WINDOW_BATCH", "ForwardTime", "forward_time", "forward_seconds",
           "device_label"]

PAPER_SIZE: tuple[int, int] = (1024, 2048)  # (height, width) of the timed image, the paper's Fig. 1
PAPER_WARMUP = 10  # passes before the timed (11th) one
PAPER_WINDOW_BATCH = 60  # sliding windows per forward

_MEASURED: dict[tuple, "ForwardTime"] = {}  # one measurement per configuration and process (see above)


@dataclass(frozen=True)
class ForwardTime:
    """One timed pass: ``seconds`` of forward compute for one image of ``size``."""

    mode: str
    stride: int  # 0 for single
    size: tuple[int, int]
    seconds: float
    windows: int  # forwards' worth of windows in a pass (1 for single)
    batches: int  # forward calls in a pass
    timed_batches: int  # forward calls timed (< batches: the pass was projected)
    warmup: int

    @property
    def projected(self) -> bool:
        return self.timed_batches < self.batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    from spar_pipeline.windows import window_starts

    return [(t, l) for t in window_starts(height, window, stride) for l in window_starts(width, window, stride)]


@torch.no_grad()
def forward_time(backbone, mode: str = "single", stride: int | None = None, *, size: Sequence[int] = PAPER_SIZE,
                 warmup: int = PAPER_WARMUP, window_batch: int = PAPER_WINDOW_BATCH,
                 max_batches: int | None = None, fresh: bool = False) -> ForwardTime:
    """The paper's timing of ``backbone`` in ``mode`` ("single" or "sliding" with ``stride``)."""
    if mode not in ("single", "sliding"):
        raise ValueError(f"timing mode {mode!r}: choose from single, sliding")
    if mode == "sliding" and (stride is None or int(stride) < 1):
        raise ValueError(f"sliding timing needs a stride ≥ 1, got {stride}")
    H, W = (int(v) for v in size)
    if H < 1 or W < 1 or int(window_batch) < 1:
        raise ValueError(f"timing size {H}×{W} and window_batch {window_batch} must be ≥ 1")
    device = model_device(backbone)
    key = (type(backbone).__name__, getattr(backbone, "name", ""), str(device), mode, int(stride or 0), H, W,
           max(0, int(warmup)), int(window_batch), max_batches)
    if not fresh and key in _MEASURED:
        return _MEASURED[key]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, H, W, generator=g).to(device)
    if mode == "single":
        batches: list[list[tuple[int, int]]] = [[]]
        windows, K = 1, None
    else:
        K = int(backbone.window)
        boxes = _boxes(H, W, K, int(stride))
        batches = [boxes[i:i + window_batch] for i in range(0, len(boxes), int(window_batch))]
        windows = len(boxes)
    run = batches if max_batches is None else batches[:max(1, int(max_batches))]
    timed_windows = 1 if mode == "single" else sum(len(b) for b in run)
    kh, kw = (min(K, H), min(K, W)) if K else (H, W)

    def one_pass() -> float:
        total = 0.0
        for part in run:
            inp = x if K is None else torch.stack([x[0, :, t:t + kh, l:l + kw] for t, l in part])
            _sync(device)
            t0 = time.perf_counter()
            backbone.dense(inp)
            _sync(device)
            total += time.perf_counter() - t0
        return total

    for _ in range(max(0, int(warmup))):
        one_pass()
    seconds = one_pass() * windows / timed_windows
    _MEASURED[key] = ForwardTime(mode, int(stride or 0) if mode == "sliding" else 0, (H, W), seconds, windows,
                                 len(batches), len(run), max(0, int(warmup)))
    return _MEASURED[key]


def device_label(backbone) -> str:
    """Where a timing was taken: the GPU's name, or "cpu, N threads" and the host."""
    import platform

    device = model_device(backbone)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({platform.node()})"
    return f"{device.type}, {torch.get_num_threads()} threads ({platform.node()})"


def forward_seconds(backbone, mode: str = "single", stride: int | None = None, **kwargs) -> float:
    """``forward_time(...).seconds``: forward seconds of one image, the paper's protocol."""
    return forward_time(backbone, mode, stride, **kwargs).seconds
