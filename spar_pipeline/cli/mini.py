"""The miniature world's commands: pretrain mini-clip, the small CLIP-style model it runs SPAR on, and
the paper's Table 1 in small on it (``python -m spar_pipeline.mini.pretrain`` / ``.mini.world`` are
the same commands)."""

from __future__ import annotations

from typing import Optional

import typer

from spar_pipeline.cli.common import Count, app, reporting
from spar_pipeline.errors import OptionError


@app.command("pretrain-mini")
def pretrain_mini(
    out: str = typer.Option("mini-clip.safetensors", "--out", help="Where the safetensors weights go."),
    seed: int = typer.Option(0, help="Seed of the scenes and the model (the shipped weights: 0)."),
    steps: Optional[int] = Count(None, help="Contrastive steps (default: the shipped weights' count, 8000 for "
                                            "mini-clip, 7000 for mini-clip-rope)."),
    minutes: Optional[float] = typer.Option(
        None, help="Wall-time cap in minutes (> 0; default: well above the reference run's). "
                   "A capped run is not the shipped reference."),
    threads: int = Count(2, help="CPU threads."),
    batch: Optional[int] = Count(None, help="Scene-caption pairs per step (default: the shipped weights' batch)."),
    backbone: str = typer.Option("mini-clip", help="mini-clip (a learned position table) or mini-clip-rope "
                                                   "(rotary positions in token units)."),
) -> None:
    """Pretrain mini-clip, the miniature world's CLIP-style model, on generated scene-caption pairs.

    Writes: the weights to --out. The package ships the result of the defaults (seed 0) and builds
    mini-clip from it; the mini recipe then runs SPAR on it with no download.
    """
    with reporting():
        from spar_pipeline.mini import pretrain as stage

        if minutes is not None and minutes <= 0:
            raise OptionError(f"--minutes {minutes}: must be > 0")
        if backbone not in stage.SHIPPED_STEPS:
            raise OptionError(f"--backbone {backbone!r}: pretrain-mini trains one of {', '.join(stage.SHIPPED_STEPS)}")

        rep = stage.main(out, seed, stage.MINUTES if minutes is None else minutes,
                         stage.SHIPPED_STEPS[backbone] if steps is None else steps, threads,
                         batch=stage.BATCH if batch is None else batch, backbone=backbone)
        typer.echo(f"pretrain-mini: {rep['steps']} steps, loss {rep['loss']}, {rep['seconds']} s -> {rep['out']}")


@app.command("mini-world")
def mini_world(
    work: str = typer.Option("runs/mini-world", "--work", help="Folder of the generated world, the run and the table."),
    bench_images: int = Count(96, help="Images of the generated scenes benchmark."),
    tars: int = Count(4, help="SA-1B-layout tars of generated scenes to train on."),
    per_tar: int = Count(16, help="Scenes per tar."),
    seed: int = typer.Option(0, help="Seed of the scenes (the benchmark uses 1000 + seed)."),
    threads: int = Count(2, help="CPU threads."),
    retime: bool = typer.Option(False, "--retime", help="Only time again the rows of an earlier call."),
) -> None:
    """The paper's Table 1 in small: pretrained single pass and sliding window against SPAR on the scenes
    benchmark, at scales 1×, 2× and 4×, on CPU with no download. Resumes: a second call only re-evaluates.

    Writes: WORK/run (the mini recipe's run), WORK/table.md (printed) and WORK/rows.json.
    """
    with reporting():
        import torch

        from spar_pipeline.mini import world

        torch.set_num_threads(threads)
        typer.echo(world.retime(work) if retime else world.main(work, bench_images, tars, per_tar, seed), nl=False)
