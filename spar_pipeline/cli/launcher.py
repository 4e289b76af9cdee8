"""``spar-pipeline train --launcher torchrun``: the same training, started by torchrun on this machine.

The command it prints is the one-machine case of what a cluster runs on every node
(``torchrun --nnodes N --nproc-per-node G -m spar_pipeline.train -- --run URL ...``, docs/multinode.md):
the train command's own options are handed on as given, less the ones that choose processes here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from enum import Enum
from typing import Any

import typer

from spar_pipeline.errors import OptionError

__all__ = ["Launcher", "forwarded", "shown", "run_torchrun", "rank_zero"]


class Launcher(str, Enum):
    """Who starts the training processes on this machine."""

    spawn = "spawn"
    torchrun = "torchrun"

_HERE_ONLY = ("launcher", "gpus", "processes")  # they choose processes on this machine: torchrun's job now
_SECRET = ("key", "secret", "token", "password")


def forwarded(ctx: typer.Context, drop: tuple[str, ...] = _HERE_ONLY) -> list[str]:
    """The command's options as given (defaults left out), for the same command in another process."""
    args: list[str] = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in drop or p.param_type_name != "option" or value is None or value == p.default:
            continue
        if p.is_flag:
            flag = p.opts[0] if value else (p.secondary_opts or [None])[0]
            args += [flag] if flag else []
        elif p.multiple:
            for v in value:
                args += [p.opts[0], str(v.value if isinstance(v, Enum) else v)]
        else:
            args += [p.opts[0], str(value.value if isinstance(value, Enum) else value)]
    return args


def shown(args: list[str]) -> str:
    """The command line to print: storage-option values that look like credentials masked."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "--storage-options":
            try:
                opts = json.loads(out[i + 1])
            except ValueError:
                continue
            if isinstance(opts, dict):
                out[i + 1] = json.dumps({k: "***" if any(s in k.lower() for s in _SECRET) else v
                                         for k, v in opts.items()})
    return shlex.join(out)


def run_torchrun(ctx: typer.Context, gpus: list[int] | None, nproc: int) -> None:
    """Print and run ``torchrun --standalone --nnodes 1 --nproc-per-node NPROC -m spar_pipeline.train
    ...``; ``gpus``: the GPUs it may use (CUDA_VISIBLE_DEVICES), None for CPU processes. Exits with
    torchrun's status when it fails."""
    from spar_pipeline import distributed

    if distributed.launched() is not None:
        raise OptionError("--launcher torchrun inside a torchrun process: this process is already one rank; "
                          "leave --launcher out")
    from spar_pipeline.cli.common import _verbose

    verbose = ["--verbose"] if _verbose[0] else []
    args = [*verbose, *forwarded(ctx)]
    cmd = distributed.torchrun_command("spar_pipeline.train", args, nproc_per_node=nproc)
    visible = ",".join(map(str, gpus)) if gpus else ""
    env: dict[str, Any] = dict(os.environ, CUDA_VISIBLE_DEVICES=visible)
    typer.echo(f"train: CUDA_VISIBLE_DEVICES={visible} {shown(cmd)}")
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise typer.Exit(code)


def rank_zero() -> bool:
    """True unless torchrun started this process as a rank other than 0."""
    from spar_pipeline import distributed

    where = distributed.launched()
    return where is None or where.rank == 0
