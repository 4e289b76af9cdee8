"""The ``spar-pipeline`` command: thin typer wrappers that load the run and call a stage.

Every stage reads the previous stage's manifest, does only what is not done yet and can be
rerun after any failure to finish the rest.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SPAR feature-store pipeline: ingest → augment → extract → train → evaluate. "
    "Every command resumes: rerun it after a failure to finish what is left.",
)
console = Console(stderr=True)

RunOpt = typer.Option(..., "--run", help="Run folder: a local path or an fsspec URL such as s3://bucket/prefix.")
RecipeOpt = typer.Option(
    None, "--recipe", help="Preset name (tiny-cpu, siglip2-b16, ...) or a TOML path. Frozen into RUN/run.toml on first use."
)
StorageOpt = typer.Option(
    None, "--storage-options", help='JSON of fsspec storage options, e.g. \'{"anon": false}\'. AWS_* variables are honoured.'
)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("distributed", "fsspec", "botocore", "s3fs", "aiobotocore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _open_run(run: str, recipe: Optional[str], storage_options: Optional[str]):
    from spar_pipeline.run import Run

    try:
        options = json.loads(storage_options) if storage_options else None
    except json.JSONDecodeError as e:
        raise _UserError(f"--storage-options: not valid JSON ({e.msg} at column {e.colno})") from None
    r = Run(run, options)
    r.resolve_recipe(recipe)
    return r


class _UserError(Exception):
    pass


def _guarded(fn: Callable[[], Any]) -> Any:
    """Known failures become one red line and exit code 2; nothing else is swallowed."""
    from spar_pipeline.fsutil import redact
    from spar_pipeline.manifest import ManifestError
    from spar_pipeline.recipe import RecipeError
    from spar_pipeline.run import RunError

    known: tuple[type[BaseException], ...] = (_UserError, RecipeError, RunError, ManifestError, FileNotFoundError, PermissionError)
    try:
        from spar_pipeline.store import StoreError

        known += (StoreError,)
    except ImportError:  # pragma: no cover - store not installed yet
        pass
    try:
        return fn()
    except known as e:
        typer.secho(f"error: {redact(str(e))}", err=True, fg="red")
        raise typer.Exit(2) from None


@app.command()
def ingest(
    sources: List[str] = typer.Argument(None, help="SA-1B tars: paths, globs, folders, fsspec URLs."),
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    max_id: Optional[int] = typer.Option(None, help="Keep sa_<id> with id ≤ N (recipe default; paper: 25000)."),
    limit: Optional[int] = typer.Option(None, help="Stop after about N new images."),
    links: Optional[str] = typer.Option(None, help="Official SA-1B links file (file_name<TAB>url)."),
    tars: Optional[str] = typer.Option(None, help="With --links: comma-separated tar names, e.g. sa_000000,sa_000001."),
    storage_options: Optional[str] = StorageOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Index SA-1B tars in place and validate every image.

    Reads: the tars (never extracted). Writes: RUN/manifests/ingest/ (one row per image: tar, byte
    offset, size, checksum, status). Resume: tars already in the manifest are skipped.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline import ingest as stage

        r = _open_run(run, recipe, storage_options)
        if not sources and not links:
            raise _UserError("give SA-1B tars (paths, globs, folders, URLs) or --links FILE --tars NAMES")
        report = stage.run(
            r, list(sources or []), links=links, tars=tars.split(",") if tars else None,
            max_id=max_id, limit=limit, storage_options=r.storage_options,
        )
        console.print(f"ingest: {report}")

    _guarded(go)


@app.command()
def augment(
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    limit: Optional[int] = typer.Option(None, help="Draw at most N new images."),
    storage_options: Optional[str] = StorageOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Draw each image's augmentation once (a pure function of seed and image id).

    Reads: the ingest manifest. Writes: RUN/manifests/augment/ (resize, crop box, flip, final size).
    Resume: images already drawn are skipped.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline import augment as stage

        r = _open_run(run, recipe, storage_options)
        console.print(f"augment: {stage.run(r, limit=limit)}")

    _guarded(go)


@app.command()
def extract(
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids: one worker process per GPU."),
    workers: Optional[int] = typer.Option(None, help="CPU worker processes (default on a machine without GPUs: 1)."),
    scheduler: Optional[str] = typer.Option(None, help="Use an existing Dask scheduler, e.g. tcp://host:8786."),
    window_batch: Optional[int] = typer.Option(None, help="Windows per forward (recipe default)."),
    limit: Optional[int] = typer.Option(None, help="Extract at most N new images."),
    storage_options: Optional[str] = StorageOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the sliding-window teacher and store one float16 map per image.

    Reads: augment manifest + tars. Writes: RUN/features.zarr and RUN/manifests/extract/ (a row only
    after its map is fully written). Resume: images with a row are skipped; a dead worker costs one batch.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline import extract as stage

        r = _open_run(run, recipe, storage_options)
        gpu_ids = [int(g) for g in gpus.split(",") if g.strip()] if gpus else None
        report = stage.run(r, gpus=gpu_ids, workers=workers, scheduler=scheduler, window_batch=window_batch, limit=limit)
        console.print(f"extract: {report}")

    _guarded(go)


@app.command("run")
def run_cmd(
    sources: List[str] = typer.Argument(None, help="SA-1B tars; none with a tiny recipe generates a small source."),
    run: str = RunOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Preset or TOML path (default tiny-cpu for a new run)."),
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids for extract and train."),
    workers: Optional[int] = typer.Option(None, help="CPU worker processes for extract."),
    scheduler: Optional[str] = typer.Option(None, help="Existing Dask scheduler for extract, e.g. tcp://host:8786."),
    limit: Optional[int] = typer.Option(None, help="Ingest at most about N images."),
    epochs: Optional[int] = typer.Option(None, help="Override the recipe's epochs."),
    storage_options: Optional[str] = StorageOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run every stage in order, each resuming, and write RUN/reports/summary.md.

    Stopped at any point and run again, it finishes what is left.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline.pipeline import run_all
        from spar_pipeline.run import Run

        probe = Run(run, json.loads(storage_options) if storage_options else None)
        default = "tiny-cpu" if recipe is None and probe.frozen_recipe() is None else recipe
        r = _open_run(run, default, storage_options)
        gpu_ids = [int(g) for g in gpus.split(",") if g.strip()] if gpus else None
        out = run_all(r, list(sources or []), gpus=gpu_ids, workers=workers, scheduler=scheduler, limit=limit,
                      epochs=epochs)
        typer.echo(out["summary"])

    _guarded(go)


@app.command()
def verify(
    run: str = RunOpt,
    repair: bool = typer.Option(False, "--repair", help="Mark damaged work as pending so the next run redoes it."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Check every manifest row against what it references (tar bytes, feature maps).

    Reads: manifests, tars, the store. Writes (with --repair): 'redo' rows for damaged items.
    Exit code 1 when anything is damaged.
    """
    _setup_logging(False)

    def go():
        from spar_pipeline.verify import verify as check

        r = _open_run(run, None, storage_options)
        report = check(r, repair=repair)
        typer.echo(f"verify: {report}")
        damaged = sum(v["damaged"] for v in report.values() if isinstance(v, dict))
        if damaged and not repair:
            raise typer.Exit(1)

    _guarded(go)


@app.command()
def status(
    run: str = RunOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Per stage: planned, done, rejected, pending, bytes and throughput, read from the manifests only."""
    _setup_logging(False)

    def go():
        from spar_pipeline import status as stage

        r = _open_run(run, None, storage_options)
        stage.print_status(r, Console())

    _guarded(go)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
