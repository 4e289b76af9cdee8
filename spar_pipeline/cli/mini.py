"""The miniature world's command: pretrain mini-clip, the small CLIP-style model it runs SPAR on."""

from __future__ import annotations

from typing import Optional

import typer

from spar_pipeline.cli.common import Count, app, reporting
from spar_pipeline.errors import OptionError


@app.command("pretrain-mini")
def pretrain_mini(
    out: str = typer.Option("mini-clip.safetensors", "--out", help="Where the safetensors weights go."),
    seed: int = typer.Option(0, help="Seed of the scenes and the model (the shipped weights: 0)."),
    steps: Optional[int] = Count(None, help="Contrastive steps (default: the shipped weights' count)."),
    minutes: float = typer.Option(40.0, help="Wall-time cap (> 0); a capped run is not the shipped reference."),
    threads: int = Count(2, help="CPU threads."),
) -> None:
    """Pretrain mini-clip, the miniature world's CLIP-style model, on generated scene-caption pairs.

    Writes: the weights to --out. The package ships the result of the defaults (seed 0) and builds
    mini-clip from it; the mini recipe then runs SPAR on it with no download.
    """
    with reporting():
        from spar_pipeline.mini import pretrain as stage

        if minutes <= 0:
            raise OptionError(f"--minutes {minutes}: must be > 0")

        rep = stage.main(out, seed, minutes, stage.DEFAULT_STEPS if steps is None else steps, threads)
        typer.echo(f"pretrain-mini: {rep['steps']} steps, loss {rep['loss']}, {rep['seconds']} s -> {rep['out']}")
