"""Data-parallel processes: spawned on one machine or started by torchrun; the process group; the collectives.

``spawn(target, world, gpus, *args)`` starts ``world`` processes (``spawn`` start method), sets up
the process group over a free ``tcp://127.0.0.1`` port (NCCL with ``gpus``, one GPU per rank; gloo
on CPU, the cores shared out), runs ``target(rank, world, *args)`` in each and returns rank 0's
result. Under ``torchrun`` (one or many machines) the processes already exist: ``launched()``
reads the ranks torchrun set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and ``init_launched``
joins the group by ``env://`` (NCCL on ``cuda:LOCAL_RANK`` when CUDA is present, else gloo).
``torchrun_command`` is the command line that starts them. The collectives below are no-ops in a
single process, so callers need not ask which case they are in.

A collective waits ``TIMEOUT`` for a slow rank, then fails: the environment variable
``SPAR_COLLECTIVE_TIMEOUT_S`` changes it (seconds), so a rank whose peer hangs gives up in bounded time.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

__all__ = ["free_port", "spawn", "active", "all_reduce_sum", "broadcast", "gather", "Launched", "launched", "settle",
           "init_launched", "leave", "peer_lost", "local_gpu", "torchrun_command", "timeout"]

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow rank (a long validation, a resume)
TIMEOUT_VARIABLE = "SPAR_COLLECTIVE_TIMEOUT_S"


def timeout() -> timedelta:
    """``TIMEOUT``, or ``SPAR_COLLECTIVE_TIMEOUT_S`` seconds when set."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        from spar_pipeline.errors import OptionError

        raise OptionError(f"{TIMEOUT_VARIABLE}={value!r}: expected seconds > 0, e.g. {TIMEOUT_VARIABLE}=600")
    return timedelta(seconds=seconds)


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
                                         rank=rank, world_size=world, timeout=timeout())
    try:
        result = target(rank, world, *args)
        if rank == 0:
            results.put(result)
        settle()  # a failed rank skips it; spawn's join then ends the others
    finally:
        torch.distributed.destroy_process_group()


def spawn(target: Callable[..., Any], world: int, gpus: Sequence[int] | None, *args: Any) -> Any:
    """Run ``target(rank, world, *args)`` in ``world`` new processes; rank 0's return value.
    ``target`` and ``args`` must pickle (a module-level function, plain data)."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_rank_main, nprocs=world, start_method="spawn", join=False,
                             args=(target, world, tuple(gpus) if gpus else None, free_port(),
                                   logging.getLogger().getEffectiveLevel(), results, args))
    # Read rank 0's result while the processes run: one larger than the pipe's buffer would otherwise keep
    # rank 0 in put() and the join waiting for it. join() raises when a process failed (the others are ended).
    result, got = None, False
    while not ctx.join(timeout=0.2):
        if not got and not results.empty():
            result, got = results.get(), True
    return result if got else results.get()


@dataclass(frozen=True)
class Launched:
    """This process's place in a torchrun job (global rank, world size, rank and process count on its machine)."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def launched() -> Launched | None:
    """Where torchrun put this process (its environment variables); None when torchrun did not start it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(n in os.environ for n in names):
        return None
    try:
        rank, world, local = (int(os.environ[n]) for n in names[:3])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        from spar_pipeline.errors import OptionError

        raise OptionError("RANK, WORLD_SIZE, LOCAL_RANK: expected integers (torchrun sets them); got "
                          + ", ".join(f"{n}={os.environ[n]!r}" for n in names[:3])) from None
    return Launched(rank, world, local, local_world)


def local_gpu() -> int | None:
    """The GPU of a torchrun process: ``LOCAL_RANK`` when CUDA is present, else None (the CPU)."""
    where = launched()
    return where.local_rank if where is not None and torch.cuda.is_available() else None


def init_launched(where: Launched) -> None:
    """Join torchrun's process group by ``env://``: NCCL on ``cuda:LOCAL_RANK`` with CUDA, else gloo
    with this machine's cores shared among its processes."""
    if torch.cuda.is_available():
        if where.local_rank >= torch.cuda.device_count():
            from spar_pipeline.errors import OptionError

            raise OptionError(f"LOCAL_RANK={where.local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                              "device(s); start at most that many processes per machine (--nproc-per-node)")
        torch.cuda.set_device(where.local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, where.local_world)))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://",
                                         rank=where.rank, world_size=where.world, timeout=timeout())


def settle() -> None:
    """Wait for every rank to finish before any leaves: a gloo process whose peer tore its connections down
    first could abort ("terminate called without an active exception", seen under load in the suite)."""
    torch.distributed.barrier()


def leave() -> None:
    """Leave the process group ``init_launched`` joined."""
    if active():
        torch.distributed.destroy_process_group()


def peer_lost(e: BaseException) -> str | None:
    """Why a collective failed when another rank died or hung (a gloo read error or timeout, an
    NCCL/c10d error), in a few words; None for any other error (this rank's own)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not (isinstance(e, getattr(torch.distributed, "DistError", ())) or
            (isinstance(e, RuntimeError) and "gloo/transport" in text)):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../pair.cc:545] " source position
    return text.split(". This is typically")[0][:160]


def torchrun_command(module: str, args: Sequence[str], *, nproc_per_node: int) -> list[str]:
    """``torchrun --standalone --nnodes 1 --nproc-per-node N -m MODULE -- ARGS`` (one machine; the
    torchrun next to this Python, else ``python -m torch.distributed.run``). The ``--`` keeps torchrun
    from reading ARGS as its own abbreviated options (``--run`` would be ``--run-path``: pytorch#120601)."""
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "torchrun"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node), "-m", module, "--", *args]


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
