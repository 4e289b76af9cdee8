"""Which device a stage computes on and in which precision; which GPUs it uses when the user names none.

GPUs are counted in a child process so the client never initialises CUDA before its GPU workers start
(a CUDA context does not survive into forked workers, and it would hold memory on GPU 0).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import subprocess
import sys

__all__ = ["default_gpus", "check_gpus", "torch_device", "worker_device", "model_device", "autocast_dtype",
           "autocast", "matmul_precision", "matmul_precision_for"]


@functools.lru_cache(maxsize=1)
def default_gpus() -> tuple[int, ...]:
    """GPU ids visible here; () on a machine without an NVIDIA device (checked without importing CUDA)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not glob.glob("/dev/nvidia[0-9]*"):
        return ()
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120)
        return tuple(range(int(out.stdout.strip() or 0)))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ()


def check_gpus(gpus: list[int], option: str = "--gpus") -> None:
    """Refuse GPU ids this machine does not have (counted as ``default_gpus`` does, without CUDA here)."""
    from spar_pipeline.errors import OptionError

    shown = ",".join(map(str, gpus))
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise OptionError(f"{option} {shown!r}: expected distinct GPU ids ≥ 0, e.g. {option} 0,1")
    have = default_gpus()
    if max(gpus) >= len(have):
        raise OptionError(f"{option} {shown}: this machine has {len(have)} CUDA device(s)"
                          + (f" (ids 0-{len(have) - 1})" if have else "; leave --gpus out to run on CPU"))


def torch_device(gpu: int | None):
    """``cuda:<gpu>`` for a GPU id, the CPU for None."""
    import torch

    return torch.device("cpu") if gpu is None else torch.device(f"cuda:{gpu}")


def worker_device():
    """A stage worker's device: its GPU when it sees one (a GPU worker sees only its own), else the CPU."""
    import torch

    return torch_device(0 if torch.cuda.is_available() else None)


def model_device(model):
    """Where ``model``'s parameters live (the CPU for a model without any): inputs go there."""
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def autocast_dtype(precision: str, device):
    """The autocast dtype of a recipe's ``precision`` ("fp16", "bf16", "fp32") on ``device``; None
    for float32. On a GPU fp16 or bf16 as named. On the CPU bf16 when asked (x1.7-1.8 on AMX, bench
    profile), while "fp16" runs in float32 there: fp16 autocast is slow on CPUs."""
    import torch

    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device, dtype):
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op context for None (float32)."""
    import contextlib

    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def matmul_precision(device) -> str | None:
    """Training's float32 matmul precision on ``device``: the reference's "medium" on a GPU (TF32/bf16 matmuls
    outside autocast); None on the CPU, which keeps PyTorch's setting: in torch 2.14 "medium" also makes the
    CPU's oneDNN float32 matmuls bf16, which would change the CPU runs' numbers."""
    return "medium" if device.type == "cuda" else None


@contextlib.contextmanager
def matmul_precision_for(device):
    """Sets ``matmul_precision(device)`` (if any) for the block and puts the previous setting back after: it is
    process-wide, and one process may run many trainings (the tests) or other stages after one."""
    import torch

    precision = matmul_precision(device)
    if precision is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
