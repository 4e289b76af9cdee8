"""Targets for ``distributed.spawn`` in tests: module-level, so that the spawned processes can import them."""

from __future__ import annotations

import numpy as np
import torch


def rank_sum_and_a_large_array(rank: int, world: int, n: int) -> tuple[float, np.ndarray]:
    """Every rank's number summed over the gloo group, and an array larger than a pipe's buffer."""
    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)
    return float(total), np.arange(n, dtype=np.float64)
