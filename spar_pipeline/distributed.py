"""Data-parallel processes on one machine: spawn, the process group, and the few collectives used.

``spawn(target, world, gpus, *args)`` starts ``world`` processes (``spawn`` start method), sets up
the process group over a free ``tcp://127.0.0.1`` port (NCCL with ``gpus``, one GPU per rank; gloo
on CPU, the cores shared out), runs ``target(rank, world, *args)`` in each and returns rank 0's
result. The collectives below are no-ops in a single process, so callers need not ask which case
they are in.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

__all__ = ["free_port", "spawn", "active", "all_reduce_sum", "broadcast", "gather"]

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow rank (a long validation, a resume)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_main(rank: int, target: Callable[..., Any], world: int, gpus: Sequence[int] | None, port: int,
               log_level: int, results, args: tuple) -> None:
    """One spawned process: logging, its device, the process group, then ``target``."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    if gpus:
        torch.cuda.set_device(gpus[rank])
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.distributed.init_process_group("nccl" if gpus else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = target(rank, world, *args)
        if rank == 0:
            results.put(result)
    finally:
        torch.distributed.destroy_process_group()


def spawn(target: Callable[..., Any], world: int, gpus: Sequence[int] | None, *args: Any) -> Any:
    """Run ``target(rank, world, *args)`` in ``world`` new processes; rank 0's return value.
    ``target`` and ``args`` must pickle (a module-level function, plain data)."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_main, nprocs=world, start_method="spawn",
                       args=(target, world, tuple(gpus) if gpus else None, free_port(),
                             logging.getLogger().getEffectiveLevel(), results, args))
    return results.get()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if active():
        torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
