"""Commands on one image: segment it, picture its principal components (features: ``cli.use``)."""

from __future__ import annotations

from typing import Optional

import typer

from spar_pipeline.cli.common import Count, Mode, StorageOpt, app, reporting, tool_run
from spar_pipeline.errors import OptionError

ImageArg = typer.Argument(..., help="An image file (any format PIL reads).")
CkptOpt = typer.Option("pretrained", "--checkpoint", help="pretrained, best (needs --run) or a weights file.")
ToolRunOpt = typer.Option(None, "--run", help="Run folder: its recipe's backbone and best checkpoint.")
BackboneOpt = typer.Option(None, "--backbone", help="Backbone name (default: the run's, else siglip2-b16-512).")


@app.command()
def segment(
    image: str = ImageArg,
    classes: str = typer.Option(..., "--classes", help='"road, car, sky" (one name per class), "background; person, '
                                "man; car\" (classes by ';', synonyms by ','), or a .txt file of class lines."),
    out: str = typer.Option("segmentation.png", "--out", help="PNG to write."),
    checkpoint: str = CkptOpt,
    run: Optional[str] = ToolRunOpt,
    backbone: Optional[str] = BackboneOpt,
    logit_scale: float = typer.Option(40.0, help="Cosine logit scale > 0 (the reference demo's 40)."),
    prob_thd: float = typer.Option(0.0, min=0.0, max=1.0, help="Pixels less sure than this go to the first class "
                                   "(background)."),
    mode: Mode = typer.Option(Mode.single, help="single or sliding."),
    stride: Optional[int] = Count(None, help="Sliding stride (mode sliding)."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Segment one image into the given classes: the image with the label map overlaid and a legend."""
    with reporting():
        from spar_pipeline import pictures

        if logit_scale <= 0:
            raise OptionError(f"--logit-scale {logit_scale}: must be > 0 (the reference demo's 40)")
        if mode is Mode.sliding and stride is None:
            raise OptionError("--mode sliding needs --stride S, e.g. --stride 24")
        if mode is Mode.single and stride is not None:
            raise OptionError(f"--stride {stride} applies to --mode sliding only; add --mode sliding")
        class_lines = [c for c in pictures.parse_classes(classes) if c.strip()]
        if not class_lines:
            raise OptionError(f"--classes {classes!r}: no class names; give e.g. --classes \"road, car, sky\"")
        info = pictures.segment_image(image, class_lines, out, backbone=backbone, checkpoint=checkpoint,
                                   run=tool_run(run, storage_options), logit_scale=logit_scale, prob_thd=prob_thd,
                                   mode=mode.value, stride=stride)
        typer.echo(f"segment: wrote {info['out']} (classes present: {', '.join(info['present']) or 'none'})")


@app.command()
def pca(
    image: str = ImageArg,
    out: str = typer.Option("pca.png", "--out", help="PNG to write (teacher left, student right)."),
    run: Optional[str] = ToolRunOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Student weights (default: the run's best, "
                                             "else pretrained)."),
    stride: Optional[int] = Count(None, help="Teacher sliding-window stride (default: the run's "
                                         "extract.stride, else 24)."),
    backbone: Optional[str] = BackboneOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """First three principal components as RGB: teacher (sliding) and student (single pass) on one basis."""
    with reporting():
        from spar_pipeline import pictures

        info = pictures.pca_image(image, out, backbone=backbone, run=tool_run(run, storage_options),
                               checkpoint=checkpoint, stride=stride)
        typer.echo(f"pca: wrote {info['out']} ({info['size'][0]}×{info['size'][1]}, student: {info['student']})")
