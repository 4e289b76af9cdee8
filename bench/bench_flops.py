"""Compute efficiency of extraction: achieved FLOP/s of the sliding-window teacher on the real
SigLIP2 ViT-B/16-512 architecture (random weights) against this machine's large-matmul FLOP/s
(goal ≥ 0.7), with the FLOP count of one window written out. Writes bench/results/flops.json.

    python -m bench flops [--quick]

FLOPs come from torch's FlopCounterMode on meta tensors (matmuls, convolutions and attention;
not elementwise ops). The forward runs in float32 with matmul precision "medium", as the
extract stage does on a CPU; the ceiling is measured under the same setting (on CPUs with AMX,
"medium" lets oneDNN run float32 matmuls in bfloat16, 3× faster than "highest").

Why it falls short, and the best lever (from `bench_profile`, see bench/NOTES.md): one window forward
is profiled and its self CPU time grouped by category (matmul, attention, layout copies, …), and
the best eager lever (heap kept + model cast to bfloat16) is timed
alternately with the baseline; its efficiency is given against both the "medium" ceiling and the
bfloat16 ceiling — the fair one, since that variant computes in bfloat16.
"""

from __future__ import annotations

import torch

from bench import bench_profile
from bench.common import backbone, forward_flops, forward_seconds, save
from spar_pipeline.windows import count_windows, sliding_features_many


def _extraction(name: str, size: tuple[int, int], stride: int, batch: int, repeats: int, warmup: bool) -> dict:
    b = backbone(name)
    K = b.window
    H, W = size
    n = count_windows(H, W, K, stride)
    x = torch.randn(3, H, W)
    secs = forward_seconds(lambda: sliding_features_many(b, [x], K, stride, batch=batch), repeats, warmup)
    per_window = forward_flops(name, K, K)
    achieved = n * per_window / secs
    return dict(backbone=name, image=[H, W], window=K, stride=stride, window_batch=batch, windows=n,
                flops_per_window=per_window, seconds=secs, seconds_per_window=secs / n, achieved_flops=achieved)


def main(quick: bool = False) -> dict:
    ceilings = bench_profile.ceilings()  # leaves precision "medium", as the extract stage sets it
    ceiling, ceiling_bf16, ceiling_highest = ceilings["float32_medium"], ceilings["bfloat16"], ceilings["highest"]
    print(f"{torch.get_num_threads()} threads: matmul 2048² float32 {ceiling / 1e9:.1f} GFLOP/s (precision medium, "
          f"the ceiling used), {ceiling_highest / 1e9:.1f} GFLOP/s (highest); bfloat16 {ceiling_bf16 / 1e9:.1f} GFLOP/s")
    rows = [_extraction("tiny-siglip", (256, 256), 24, 32, 5, True)]
    # SigLIP2: 2 (quick) or 4 windows of 512 at stride 24, all in one batch; no warm-up (a forward is seconds)
    rows.append(_extraction("siglip2-b16-512", (512, 528 if quick else 576), 24, 4, 1 if quick else 3, False))
    for r in rows:
        r["efficiency_vs_matmul"] = r["achieved_flops"] / ceiling
        print(f"{r['backbone']:16s} {r['image'][0]}×{r['image'][1]} K={r['window']} s={r['stride']} "
              f"{r['windows']} windows: {r['flops_per_window'] / 1e9:.2f} GFLOP/window, "
              f"{r['seconds_per_window']:.3f} s/window, {r['achieved_flops'] / 1e9:.1f} GFLOP/s = "
              f"{r['efficiency_vs_matmul']:.2f}× matmul")
    why = _why(quick)
    return save("flops", dict(
        quick=quick, threads=torch.get_num_threads(), torch=torch.__version__,
        matmul_flops_float32=ceiling, matmul_flops_float32_highest=ceiling_highest,
        matmul_flops_bfloat16=ceiling_bf16,
        flop_counting="torch.utils.flop_counter.FlopCounterMode on meta tensors (matmul, conv, attention bmm)",
        flops_per_window={r["backbone"]: r["flops_per_window"] for r in rows},
        cases=rows, goal={"efficiency_vs_matmul": ">= 0.7"}, **why,
    ))


def _why(quick: bool) -> dict:
    """Where the SigLIP2 forward's time goes (category shares of one profiled window) and the best
    eager lever's figures, measured alternately with the baseline (bench_profile does the work)."""
    b = backbone(bench_profile.NAME)
    bd = bench_profile.breakdown(b, torch.randn(1, 3, 512, 512))
    bench_profile.print_breakdown("where a SigLIP2 window's time goes (float32 medium)", bd)
    image = torch.randn(3, 512, 512)
    ref, base_num = bench_profile.reference(b, image)
    lever = bench_profile.levers(b, image, [bench_profile.BEST_EAGER], 3 if quick else 5, ref)[bench_profile.BEST_EAGER]
    return dict(
        breakdown={"share_of_forward": bd["share"], "matmul_flops_per_s": bd["matmul_flops_per_s"],
                   "matmul_vs_medium_ceiling": bd["matmul_vs_medium_ceiling"],
                   "attention_flops_per_s": bd["attention_flops_per_s"]},
        baseline_numerics_vs_highest=base_num,
        best_lever={"name": bench_profile.BEST_EAGER, **lever,
                    "fair_efficiency": "efficiency_vs_own_precision (bfloat16 matmul ceiling)"})


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
