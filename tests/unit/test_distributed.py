"""distributed.spawn: real processes in a real gloo group."""

from __future__ import annotations

import numpy as np

from spar_pipeline.distributed import spawn

from _spawned import rank_sum_and_a_large_array  # tests/ is on sys.path (and so on the spawned processes')


def test_spawn_returns_rank_zeros_result_even_one_larger_than_a_pipe_holds():
    # 8 MB: with the join before the read, rank 0 waited in put() for a reader that waited for it (a hang)
    total, array = spawn(rank_sum_and_a_large_array, 2, None, 1_000_000)
    assert total == 3.0  # ranks 0 and 1 both took part
    assert array.shape == (1_000_000,) and array[-1] == 999_999
