"""The spar-pipeline command as a user types it: one subprocess per call, for the tests that drive the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).with_name("spar-pipeline"))


def cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``spar-pipeline ARGS`` in a wide terminal (help unwrapped); assert it succeeded unless ``check`` is off.
    ``timeout``: seconds before the command is killed (the suite's per-test limit by default)."""
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out
