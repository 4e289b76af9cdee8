"""Inference: one pass over the whole image against the sliding-window teacher (s = 24 and
s = 256), seconds per image on the real SigLIP2 ViT-B/16-512 architecture (random weights),
next to the ratio of their FLOP counts. Writes bench/results/inference.json.

    python -m bench inference [--quick]

At s = 24 a 1024×2048 image is 1,495 windows of 512 (over an hour on 2 CPU cores), so a sliding
time is *measured* only where the window count is small enough for the mode, and otherwise
*projected* as (windows × measured seconds per window); every row says which. Quick mode
measures single passes at 512² and 1024² and sliding at 512² only; full mode adds the
1024×2048 single pass and sliding at s = 256 on every size.
"""

from __future__ import annotations

import torch

from bench.common import backbone, forward_flops, forward_seconds, save
from spar_pipeline.windows import count_windows, sliding_features

NAME = "siglip2-b16-512"
SIZES = [(512, 512), (1024, 1024), (1024, 2048)]
STRIDES = [24, 256]


def _single(b, H: int, W: int) -> float:
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        return forward_seconds(lambda: b.dense(x), 1, warmup=False)


def _sliding(b, H: int, W: int, stride: int, batch: int) -> float:
    x = torch.randn(1, 3, H, W)
    return forward_seconds(lambda: sliding_features(b, x, b.window, stride, batch=batch), 1, warmup=False)


def main(quick: bool = False) -> dict:
    torch.set_float32_matmul_precision("medium")
    b = backbone(NAME)
    K = b.window
    per_window = forward_flops(NAME, K, K)
    max_windows = 1 if quick else 21  # the most windows a sliding run may take to be measured, not projected
    single_sizes = SIZES[:2] if quick else SIZES
    # seconds per window, from one measured window of the real sliding path (upsample and stitching included)
    sec_per_window = _sliding(b, K, K, 24, 10)
    rows = []
    for H, W in SIZES:
        single_flops = forward_flops(NAME, H, W)
        row = dict(image=[H, W], single_flops=single_flops,
                   single_seconds=_single(b, H, W) if (H, W) in single_sizes else None)
        for s in STRIDES:
            n = count_windows(H, W, K, s)
            measured = n <= max_windows
            secs = (sec_per_window if (H, W) == (K, K) else _sliding(b, H, W, s, 10)) if measured \
                else n * sec_per_window
            row[f"s{s}"] = dict(windows=n, flops=n * per_window, flop_ratio=n * per_window / single_flops,
                                seconds=secs, measured=measured,
                                time_ratio=secs / row["single_seconds"] if row["single_seconds"] else None)
        rows.append(row)
        line = f"{H}×{W}: single " + (f"{row['single_seconds']:.2f} s" if row["single_seconds"] else "not run")
        line += f" ({single_flops / 1e9:.0f} GFLOP)"
        for s in STRIDES:
            r = row[f"s{s}"]
            line += (f" | s={s}: {r['windows']} win, {r['seconds']:.1f} s {'measured' if r['measured'] else 'projected'}"
                     f", FLOP ratio {r['flop_ratio']:.1f}×")
            if r["time_ratio"]:
                line += f", time ratio {r['time_ratio']:.1f}×"
        print(line, flush=True)
    print(f"seconds per window (measured, 512² at s=24, stitching included): {sec_per_window:.2f}; "
          f"{'quick' if quick else 'full'} mode: sliding runs above {max_windows} window(s) are projected")
    return save("inference", dict(
        quick=quick, backbone=NAME, window=K, threads=torch.get_num_threads(), flops_per_window=per_window,
        seconds_per_window=sec_per_window, max_measured_windows=max_windows, sizes=rows,
        note="'projected' sliding seconds = windows × measured seconds per window; paper reports 52× for s=24",
    ))


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
