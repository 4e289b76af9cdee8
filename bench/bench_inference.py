"""Inference: the single pass against the sliding-window teacher (s = 24 and s = 256), timed as the
paper does (``spar_pipeline.timing``: only the ViT forward passes of one 1024×2048 image; sliding
= the sum over sub-batches of 60 windows; warm-up passes, then one timed), on the real SigLIP2
ViT-B/16-512 architecture (random weights), next to the ratio of their FLOP counts. Writes
bench/results/inference.json.

    python -m bench inference [--quick]

On a GPU every pass is the paper's: 10 warm-up passes, all windows timed. On a CPU the paper's
pass is out of reach (s = 24 is 1,495 windows of 512, over 10 minutes a pass on 2 cores), so a
sliding pass times its first sub-batch of 60 windows and scales the sum to all windows
(``projected``), with fewer warm-up passes (full: 1, quick: 0); every row says which.
"""

from __future__ import annotations

import torch

from bench.common import backbone, forward_flops, save
from spar_pipeline.timing import PAPER_SIZE, PAPER_WARMUP, PAPER_WINDOW_BATCH, forward_time

NAME = "siglip2-b16-512"
STRIDES = [24, 256]


def measure(b, name: str, size=PAPER_SIZE, strides=STRIDES, warmup: int = PAPER_WARMUP,
            max_batches: int | None = None) -> dict:
    """Single and sliding forward seconds of ``b`` at ``size`` with FLOP counts and ratios."""
    H, W = size
    single_flops = forward_flops(name, H, W)
    single = forward_time(b, "single", size=size, warmup=warmup, fresh=True)
    out = dict(backbone=name, image=[H, W], warmup=warmup, window_batch=PAPER_WINDOW_BATCH,
               single=dict(forward_seconds=single.seconds, flops=single_flops))
    per_window = forward_flops(name, b.window, b.window)
    for s in strides:
        t = forward_time(b, "sliding", s, size=size, warmup=warmup, max_batches=max_batches, fresh=True)
        flops = t.windows * per_window
        out[f"s{s}"] = dict(forward_seconds=t.seconds, windows=t.windows, batches=t.batches,
                            timed_batches=t.timed_batches, projected=t.projected, flops=flops,
                            flop_ratio=flops / single_flops, time_ratio=t.seconds / single.seconds)
    return out


def main(quick: bool = False) -> dict:
    torch.set_float32_matmul_precision("medium")
    b = backbone(NAME)
    cuda = torch.cuda.is_available()
    if cuda:
        b = b.cuda()
    warmup, max_batches = (PAPER_WARMUP, None) if cuda else ((0 if quick else 1), 1)
    r = measure(b, NAME, warmup=warmup, max_batches=max_batches)
    H, W = r["image"]
    line = f"{H}×{W}, {warmup} warm-up pass(es): single {r['single']['forward_seconds']:.3f} s " \
           f"({r['single']['flops'] / 1e9:.0f} GFLOP)"
    for s in STRIDES:
        x = r[f"s{s}"]
        line += (f" | s={s}: {x['windows']} windows, {x['forward_seconds']:.2f} s "
                 f"{'projected from ' + str(x['timed_batches']) + ' sub-batch(es)' if x['projected'] else 'measured'}"
                 f", FLOP ratio {x['flop_ratio']:.1f}×, time ratio {x['time_ratio']:.1f}×")
    print(line, flush=True)
    import os

    return save("inference", dict(
        quick=quick, device=torch.cuda.get_device_name() if cuda else "cpu", threads=torch.get_num_threads(),
        load_average_1min=os.getloadavg()[0],  # other jobs on the machine slow a CPU run
        window=b.window, **r,
        note="forward_seconds: the paper's timing (ViT forwards only; sliding summed over sub-batches of 60); "
             "'projected': the first sub-batch(es) timed, scaled to all windows; paper reports 52× for s=24",
    ))


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
