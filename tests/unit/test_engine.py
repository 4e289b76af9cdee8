"""engine: a real LocalCluster; a SparError in a task fails the stage at once, other errors keep their retries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dask
import pytest

from spar_pipeline.engine import open_engine
from spar_pipeline.errors import BackboneError, EndpointError


def _tries(marker: Path) -> int:
    return len(marker.read_text()) if marker.exists() else 0


def test_spar_error_in_a_task_is_not_retried_and_fails_at_once(tmp_path):
    # Defined here so that cloudpickle sends them by value: the workers need not import this module.
    def deterministic(marker: str) -> None:
        with open(marker, "a") as f:
            f.write("x")
        raise BackboneError("worker: weights of tiny differ from the client's (aaa != bbb)")

    def flaky(marker: str) -> str:
        with open(marker, "a") as f:
            f.write("x")
        if len(open(marker).read()) < 2:
            raise RuntimeError("a read that may pass next time")
        return "ok"

    bad, wobbly = tmp_path / "bad", tmp_path / "wobbly"
    with open_engine(workers=1) as engine:
        assert engine.results([engine.submit(flaky, str(wobbly), retries=3, pure=False)]).__next__() == "ok"
        with pytest.raises(BackboneError, match=r"weights of tiny differ"):
            list(engine.results([engine.submit(deterministic, str(bad), retries=3, pure=False)]))
    assert _tries(wobbly) == 2  # the flaky task was retried once and passed
    assert _tries(bad) == 1  # the deterministic one ran once, not 1 + 3 retries


def test_unreachable_scheduler_is_one_line_naming_it():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(EndpointError, match=rf"--scheduler tcp://127.0.0.1:{port}: no Dask scheduler answered"):
            with open_engine(scheduler=f"tcp://127.0.0.1:{port}"):
                pass


@pytest.mark.parametrize("workers", [1, 2])
def test_a_cpu_worker_gets_its_share_of_the_cores_and_keeps_freed_memory(workers, monkeypatch):
    # distributed's default pre-spawn environment gave each worker ONE torch thread and a 64 KiB malloc trim
    # threshold: the miniature teacher ran 3× slower in a worker than in the client (bench/NOTES.md).
    def environment() -> tuple[int, str | None, str | None]:
        import os

        import torch

        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("MALLOC_TRIM_THRESHOLD_")

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the client's own setting, put back afterwards
    share = max(1, (os.cpu_count() or 1) // workers)
    with open_engine(workers=workers) as engine:
        assert engine.n_workers == workers
        got = list(engine.results([engine.submit(environment, pure=False) for _ in range(workers)]))
    assert got == [(share, str(share), None)] * workers
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MALLOC_TRIM_THRESHOLD_" not in os.environ
