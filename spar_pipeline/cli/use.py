"""Commands that take a student out of the run: export it for other code, and features for many images."""

from __future__ import annotations

from typing import List, Optional

import typer

from spar_pipeline.cli.common import Count, Mode, RunOpt, StorageOpt, app, open_run, reporting, tool_run


@app.command()
def export(
    run: str = RunOpt,
    out: str = typer.Option(..., "--out", help="Folder to write (created; files of an earlier export replaced)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student name (default: the run's one student)."),
    push: Optional[str] = typer.Option(None, "--push", help="Also upload the folder to this Hugging Face model repo, "
                                       "ORG/NAME (token: HF_TOKEN or a saved login)."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Export the student as a folder open_clip loads (local-dir:/hf-hub:), with spar_config.json and a model card.

    Reads: the student's best weights, run.toml, the manifests (results, training images) and the run's
    pictures. Writes: OUT/ (open_clip_config.json + open_clip_model.safetensors, or dinov3_backbone.pth
    in the official dinov3 layout; spar_config.json; README.md; images/). Resume: rerunning writes the
    same folder again; a failed --push leaves it complete.
    """
    with reporting():
        from spar_pipeline import export as stage

        r = open_run(run, None, storage_options)
        rep = stage.run(r, out, student=student, push_to=push)
        typer.echo(f"export: wrote {rep['out']} ({rep['backbone']}, student {rep['student']}: {rep['weights']}, "
                   f"{rep['results']} result(s) and {rep['pictures']} picture(s) in the model card)")
        for note in rep["notes"]:
            typer.echo(f"note: {note}")
        if rep.get("pushed"):
            typer.echo(f"pushed: {rep['pushed']}")


@app.command()
def features(
    sources: List[str] = typer.Argument(..., help="Images: files, folders (recursive), globs, or list files "
                                        "(.txt/.lst, one path a line)."),
    out: str = typer.Option(..., "--out", help="DIR.zarr (a feature store, float16), FILE.npy (one image), or a "
                            "folder of float32 .npy files."),
    checkpoint: str = typer.Option("pretrained", "--checkpoint", help="pretrained, best (needs --run), a weights "
                                   "file, an exported folder, RUN:STUDENT or hf-hub:ORG/NAME."),
    run: Optional[str] = typer.Option(None, "--run", help="Run folder: its recipe's backbone and best checkpoint."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone name (default: the run's, else "
                                           "siglip2-b16-512)."),
    mode: Mode = typer.Option(Mode.single, help="single (one pass) or sliding (the teacher's windows)."),
    stride: Optional[int] = Count(None, help="Sliding stride (mode sliding)."),
    scale: float = typer.Option(1.0, help="Resize each image by this factor first (> 0)."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Raw dense features (h × w × D, not normalised) of every image, one map each.

    Reads: the images and the model. Writes: OUT (index.json names every image's map). Resume: maps
    already written are skipped; an unreadable image is one line and is tried again next time.
    """
    with reporting():
        from spar_pipeline import features as stage
        from spar_pipeline.api import model_for
        from spar_pipeline.errors import OptionError

        if mode is Mode.sliding and stride is None:
            raise OptionError("--mode sliding needs --stride S, e.g. --stride 24")
        if mode is Mode.single and stride is not None:
            raise OptionError(f"--stride {stride} applies to --mode sliding only; add --mode sliding")
        model = model_for(checkpoint, run=tool_run(run, storage_options), backbone=backbone)
        rep = stage.run(model, sources, out, mode=mode.value, stride=stride, scale=scale,
                        warn=lambda line: typer.echo(line, err=True))
        if "shape" in rep:
            typer.echo(f"features: wrote {out} shape {rep['shape']}")
        else:
            typer.echo(f"features: {rep['written']} written, {rep['skipped']} already done, {rep['unreadable']} "
                       f"unreadable of {rep['images']} images -> {out}")
