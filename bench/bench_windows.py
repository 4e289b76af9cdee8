"""Sliding-window teacher: windows/s batched vs one window at a time, and the share of time outside
the model forward (goal ≤ 5%). Random weights; prints figures and writes bench/results/windows.json.

    python bench/bench_windows.py [--quick]      (or: python -m bench windows)
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make spar_pipeline importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spar_pipeline.backbones import build  # noqa: E402
from spar_pipeline.windows import Canvas, sliding_features, window_starts  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timed:
    """Duck-typed backbone that adds up the seconds spent inside ``dense``."""

    def __init__(self, backbone, device: torch.device):
        self.b, self.device, self.seconds, self.calls = backbone, device, 0.0, 0
        self.patch_size, self.dim = backbone.patch_size, backbone.dim

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        t = time.perf_counter()
        out = self.b.dense(x)
        _sync(self.device)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


@torch.no_grad()
def _naive(backbone, x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """One window per forward, each added to the canvas on its own (the straightforward loop)."""
    H, W = x.shape[-2:]
    canvas = Canvas(H, W, backbone.patch_size, stride, backbone.dim, x.device)
    for top in window_starts(H, window, stride):
        for left in window_starts(W, window, stride):
            f = backbone.dense(x[..., top:top + window, left:left + window])
            canvas.add(f[0].permute(2, 0, 1), top, left)
    return canvas.result()


def _measure(name: str, size: int, stride: int, batch: int, device: torch.device, repeats: int) -> dict:
    from bench.common import backbone

    b = backbone(name).to(device)
    K = b.window
    x = torch.randn(1, 3, size, size, device=device)
    n = len(window_starts(size, K, stride)) ** 2
    out: dict = dict(backbone=name, image=f"{size}x{size}", window=K, stride=stride, batch=batch, windows=n)
    for mode, fn in (("batched", lambda m: sliding_features(m, x, K, stride, batch=batch)),
                     ("naive", lambda m: _naive(m, x, K, stride))):
        fn(b)  # warm-up
        best = None
        for _ in range(repeats):
            timed = _Timed(b, device)
            _sync(device)
            t = time.perf_counter()
            fn(timed)
            _sync(device)
            total = time.perf_counter() - t
            if best is None or total < best[0]:
                best = (total, timed.seconds)
        total, fwd = best
        out[mode] = dict(seconds=round(total, 4), windows_per_second=round(n / total, 2),
                         forward_seconds=round(fwd, 4), outside_forward_share=round(1 - fwd / total, 4))
    out["speedup"] = round(out["naive"]["seconds"] / out["batched"]["seconds"], 2)
    return out


def main(quick: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("medium")
    cases = [("tiny-siglip", 256 if quick else 512, 24, 10, 3 if quick else 5)]
    if device.type == "cuda":
        cases.append(("siglip2-b16-512", 640, 24, 10, 3))  # 49 windows of 512
    elif not quick:  # CPU: 4 windows of 512 keeps the run near a minute (quick: bench flops/levers cover SigLIP2)
        cases.append(("siglip2-b16-512", 528, 24, 4, 1))
    results = dict(machine=f"{platform.machine()} {platform.processor()}".strip(), device=str(device),
                   torch=torch.__version__, threads=torch.get_num_threads(), cases=[])
    for name, size, stride, batch, repeats in cases:
        r = _measure(name, size, stride, batch, device, repeats)
        results["cases"].append(r)
        print(f"{name:16s} {r['image']} K={r['window']} s={stride} {r['windows']} windows | "
              f"batched {r['batched']['windows_per_second']:8.1f} win/s "
              f"(outside forward {100 * r['batched']['outside_forward_share']:.1f}%) | "
              f"naive {r['naive']['windows_per_second']:8.1f} win/s "
              f"(outside forward {100 * r['naive']['outside_forward_share']:.1f}%) | x{r['speedup']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "windows.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
