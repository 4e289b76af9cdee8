"""Optimisation levers for the teacher forward on the real SigLIP2 ViT-B/16-512 architecture, each
measured as a ratio to a baseline timed in the same run (noisy shared machines: compare within
one run only). Predictions and keep/drop decisions are in bench/NOTES.md. Writes
bench/results/levers.json.

    python -m bench levers [--quick]

Baseline: float32 with matmul precision "medium" (what the extract stage sets), timm's fused
SDPA attention, all threads, the window batch of the quick/full case. Each variant is timed
alternately with the baseline (ABAB…) and reported as a ratio of medians. Quick: 1 window,
2 pairs; full: 3 windows, 3 pairs, plus channels-last, window batch 1 and torch.compile.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from bench.common import DenseOnly, backbone, median_time, save
from spar_pipeline.windows import count_windows, sliding_features_many

NAME = "siglip2-b16-512"


@contextlib.contextmanager
def _setting(variant: str, b):
    """Apply one lever around the timed call, and undo it."""
    attn = [m for m in b.modules() if hasattr(m, "fused_attn")]
    threads = torch.get_num_threads()
    if variant == "precision_highest":
        torch.set_float32_matmul_precision("highest")
    if variant == "attention_math":
        for m in attn:
            m.fused_attn = False
    if variant == "threads_1":
        torch.set_num_threads(1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16) if variant == "autocast_bf16" else contextlib.nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision("medium")
        for m in attn:
            m.fused_attn = True
        torch.set_num_threads(threads)


def _time(model, image: torch.Tensor, batch: int, repeats: int, variant: str, b) -> float:
    K = b.window
    with _setting(variant, b):
        x = image.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else image
        return median_time(lambda: sliding_features_many(model, [x[0]], K, 24, batch=batch), repeats)


def _paired(b, model, image: torch.Tensor, batch: int, repeats: int, variant: str) -> dict:
    """Baseline and variant timed alternately (ABAB…), so load changes hit both alike."""
    base, var = [], []
    for _ in range(repeats):
        base.append(_time(b, image, batch, 1, "baseline", b))
        var.append(_time(model, image, batch, 1, variant, b))
    n = count_windows(image.shape[-2], image.shape[-1], b.window, 24)
    base_s, var_s = statistics.median(base), statistics.median(var)
    return dict(seconds_per_window=var_s / n, baseline_seconds_per_window=base_s / n, speedup=base_s / var_s)


def main(quick: bool = False) -> dict:
    torch.set_float32_matmul_precision("medium")
    b = backbone(NAME)
    width, repeats = (512, 2) if quick else (560, 3)  # 1 or 3 windows of 512 at stride 24
    image = torch.randn(1, 3, 512, width)
    n = count_windows(image.shape[-2], image.shape[-1], b.window, 24)
    variants = ["autocast_bf16", "attention_math", "threads_1", "precision_highest"]
    if not quick:
        variants.append("channels_last")
    rows: dict = {v: _paired(b, b, image, n, repeats, v) for v in variants}
    if not quick:
        for batch in (1,):
            base = [_time(b, image, n, 1, "baseline", b) for _ in range(repeats)]
            var = [_time(b, image, batch, 1, "baseline", b) for _ in range(repeats)]
            rows[f"window_batch_{batch}_vs_{n}"] = dict(seconds_per_window=statistics.median(var) / n,
                                                      speedup=statistics.median(base) / statistics.median(var))
        t = time.perf_counter()
        compiled = DenseOnly(b, torch.compile(b.dense))
        sliding_features_many(compiled, [image[0]], b.window, 24, batch=n)  # compiles
        compile_s = time.perf_counter() - t
        rows["torch_compile"] = dict(compile_seconds=compile_s, **_paired(b, compiled, image, n, repeats, "baseline"))
    for v, r in rows.items():
        print(f"{v:20s} {r['seconds_per_window']:6.2f} s/window  speedup {r['speedup']:.2f}×"
              + (f"  (compile {r['compile_seconds']:.0f} s)" if "compile_seconds" in r else ""), flush=True)
    return save("levers", dict(quick=quick, backbone=NAME, image=[512, width], windows=n, window_batch=n,
                               repeats=repeats, threads=torch.get_num_threads(), variants=rows,
                               note="speedup = median baseline / median variant seconds, timed alternately in the same run"))


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
