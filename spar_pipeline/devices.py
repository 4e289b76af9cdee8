"""Which GPUs a stage uses when the user names none: all that this machine has.

Counted in a child process so the client never initialises CUDA before its GPU workers start
(a CUDA context does not survive into forked workers, and it would hold memory on GPU 0).
"""

from __future__ import annotations

import functools
import glob
import os
import subprocess
import sys

__all__ = ["default_gpus"]


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
