"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def save(name: str, data: dict) -> dict:
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return data


@functools.cache
def backbone(name: str):
    """One built backbone per process (building SigLIP2 with random weights takes ~10 s on 2 cores)."""
    import logging

    from spar_pipeline.backbones import build

    logging.getLogger("spar_pipeline").setLevel(logging.ERROR)  # the "RANDOM weights" warning, once is plenty
    b = build(name).eval()
    for p in b.parameters():
        p.requires_grad_(False)
    return b


@functools.cache
def _meta_model(name: str):
    import copy

    return copy.deepcopy(backbone(name)).to("meta")


@functools.cache
def flops_per_op(name: str, height: int, width: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of one ``dense`` forward by op, counted by torch's FlopCounterMode on meta tensors (no compute).

    Counts matmuls, convolutions and attention (bmm); elementwise ops (norms, GELU, softmax) are
    not counted, as usual for FLOP figures (they are < 2% of a ViT-B forward).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = _meta_model(name)
    x = torch.empty(batch, 3, height, width, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.dense(x)
    return {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}


def forward_flops(name: str, height: int, width: int, batch: int = 1) -> int:
    """Total FLOPs of one ``dense`` forward (see ``flops_per_op``)."""
    return sum(flops_per_op(name, height, width, batch).values())


class DenseOnly:
    """The duck type ``sliding_features_many`` needs: a backbone's sizes with ``dense`` replaced
    (a compiled or bf16 forward), so a lever is timed through the same stitching."""

    def __init__(self, b, dense: Callable):
        self.patch_size, self.dim, self.window, self.dense = b.patch_size, b.dim, b.window, dense


def matmul_flops(n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """This machine's large-matmul FLOP/s (n×n @ n×n, median of ``repeats``), the compute ceiling."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    return 2 * n ** 3 / median_time(lambda: a @ b, repeats)


def forward_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of ``fn``, after one untimed warm-up call unless ``warmup`` is False."""
    if warmup:
        fn()
    return median_time(fn, repeats)
