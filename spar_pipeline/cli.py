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

    from spar_pipeline.backbones import BackboneError
    from spar_pipeline.checkpoint import CheckpointError
    from spar_pipeline.datasets import DatasetError
    from spar_pipeline.evaluate import EvaluateError
    from spar_pipeline.store import StoreError
    from spar_pipeline.train import TrainError

    known: tuple[type[BaseException], ...] = (
        _UserError, BackboneError, RecipeError, RunError, ManifestError, StoreError, TrainError, EvaluateError, DatasetError,
        CheckpointError, OSError,  # disk full, read-only, permission, an object store past its retries
    )
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
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids: one worker process per GPU "
                                       "(default: every GPU of this machine)."),
    workers: Optional[int] = typer.Option(None, help="CPU worker processes instead (default on a machine without GPUs: 1)."),
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
        report = stage.run(r, gpus=_gpu_ids(gpus), workers=workers, scheduler=scheduler, window_batch=window_batch, limit=limit)
        console.print(f"extract: {report}")

    _guarded(go)


@app.command()
def train(
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids: one DDP process per GPU (NCCL; "
                                       "default: every GPU of this machine)."),
    processes: Optional[int] = typer.Option(None, help="CPU data-parallel processes instead (gloo; default 1 "
                                            "on a machine without GPUs)."),
    epochs: Optional[int] = typer.Option(None, help="Override the recipe's epochs."),
    trainable: Optional[str] = typer.Option(None, help="Parameters to train, e.g. blk_-1,blk_-2 (recipe default)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest intact checkpoint "
                                "(default), or clear the run's checkpoints and train manifest first."),
    storage_options: Optional[str] = StorageOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Distil the student: single pass on each augmented image, MSE against its stored teacher map.

    Reads: augment + extract manifests, the tars, RUN/features.zarr. Writes: RUN/checkpoints/ (step and
    epoch checkpoints, best.safetensors, best_open_clip.safetensors) and RUN/manifests/train/ (a row per
    epoch with val_mse). Resume: rerun (or --resume) continues from the newest intact checkpoint.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline import train as stage

        r = _open_run(run, recipe, storage_options)
        rep = stage.run(r, gpus=_gpu_ids(gpus), epochs=epochs, trainable=trainable, resume=resume,
                        processes=processes)
        best = rep.get("best_val_mse")
        typer.echo(f"train: step {rep['step']} ({rep['steps_this_run']} this run) on {rep['train_images']} images, "
                   f"{rep['world']} process(es); held-out MSE best {best if best is None else f'{best:.4g}'} "
                   f"vs pretrained {rep['baseline_val_mse']:.4g}; data wait {rep['data_wait_share']:.1%}; "
                   f"best student: {r.url_for('checkpoints', 'best.safetensors')}")

    _guarded(go)


@app.command()
def evaluate(
    dataset: List[str] = typer.Option([], "--dataset", help="NAME=PATH, repeatable; NAME in voc21, voc20, context60, "
                                      "context59, ade20k, cityscapes; PATH the dataset root in the mmseg layout. "
                                      "None: the held-out teacher MSE of each checkpoint (needs --run)."),
    run: Optional[str] = typer.Option(None, "--run", help="Run folder (its recipe, best checkpoint and reports)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Preset or TOML path when there is no --run."),
    checkpoint: List[str] = typer.Option(["pretrained"], "--checkpoint", help="pretrained, best or a weights file; "
                                         "repeatable to compare several models in one call."),
    mode: List[str] = typer.Option(["single"], "--mode", help="single and/or sliding (repeatable)."),
    stride: List[int] = typer.Option([], "--stride", help="Sliding stride(s), repeatable (recipe default)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone name overriding the recipe's."),
    limit: Optional[int] = typer.Option(None, help="First N images of each dataset."),
    redo: bool = typer.Option(False, "--redo", help="Evaluate again rows already in the manifest."),
    storage_options: Optional[str] = StorageOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Open-vocabulary mIoU on the benchmarks, single pass and/or sliding window, with seconds per image.

    Reads: the datasets, the checkpoint(s). Writes (with --run): RUN/manifests/evaluate/ (a row per model,
    mode, stride, dataset) and RUN/reports/table.md + table.csv. Resume: rows already there are skipped.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline import evaluate as stage

        datasets = _datasets(dataset)
        r = _open_run(run, recipe, storage_options) if run else None
        if not datasets:
            if r is None:
                raise _UserError("give --dataset NAME=PATH, or --run RUN for the held-out teacher MSE of each checkpoint")
            for ck in checkpoint:
                from spar_pipeline.tools import load_models

                _, model = load_models(backbone, ck, r, need_pretrained=False)
                typer.echo(f"{ck:>12} held-out teacher MSE {stage.feature_mse(model, r):.6g}")
            return
        rows = stage.run(r, datasets, checkpoints=checkpoint, modes=mode, strides=stride or None, limit=limit,
                         backbone=backbone, recipe=None if r is not None else recipe, redo=redo)
        for row in rows:
            s = f" s={row['stride']}" if row["stride"] else ""
            typer.echo(f"{row['model']:>12} {row['mode']}{s:<6} {row['dataset']:<11} mIoU {row['miou']:6.2f}  "
                       f"{row['seconds_per_image']:.4f} s/image  ({row['images']} images)")
        if r is not None:
            typer.echo(f"table: {r.url_for('reports', 'table.md')}")

    _guarded(go)


@app.command("pretrain-mini")
def pretrain_mini(
    out: str = typer.Option("mini-clip.safetensors", "--out", help="Where the safetensors weights go."),
    seed: int = typer.Option(0, help="Seed of the scenes and the model (the shipped weights: 0)."),
    steps: Optional[int] = typer.Option(None, help="Contrastive steps (default: the shipped weights' count)."),
    minutes: float = typer.Option(40.0, help="Wall-time cap; a capped run is not the shipped reference."),
    threads: int = typer.Option(2, help="CPU threads."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Pretrain mini-clip, the miniature world's CLIP-style model, on generated scene-caption pairs.

    Writes: the weights to --out. The package ships the result of the defaults (seed 0) and builds
    mini-clip from it; the mini recipe then runs SPAR on it with no download.
    """
    _setup_logging(verbose)

    def go():
        from spar_pipeline.mini import pretrain as stage

        rep = stage.main(out, seed, minutes, steps or stage.DEFAULT_STEPS, threads)
        typer.echo(f"pretrain-mini: {rep['steps']} steps, loss {rep['loss']}, {rep['seconds']} s -> {rep['out']}")

    _guarded(go)


ImageArg = typer.Argument(..., help="An image file (any format PIL reads).")
CkptOpt = typer.Option("pretrained", "--checkpoint", help="pretrained, best (needs --run) or a weights file.")
ToolRunOpt = typer.Option(None, "--run", help="Run folder: its recipe's backbone and best checkpoint.")
BackboneOpt = typer.Option(None, "--backbone", help="Backbone name (default: the run's, else siglip2-b16-512).")


def _tool_run(run: Optional[str], storage_options: Optional[str]):
    return _open_run(run, None, storage_options) if run else None


@app.command()
def segment(
    image: str = ImageArg,
    classes: str = typer.Option(..., "--classes", help='"road, car, sky" (one name per class), "background; person, '
                                "man; car\" (classes by ';', synonyms by ','), or a .txt file of class lines."),
    out: str = typer.Option("segmentation.png", "--out", help="PNG to write."),
    checkpoint: str = CkptOpt,
    run: Optional[str] = ToolRunOpt,
    backbone: Optional[str] = BackboneOpt,
    logit_scale: float = typer.Option(40.0, help="Cosine logit scale (the reference demo's 40)."),
    prob_thd: float = typer.Option(0.0, help="Pixels less sure than this go to the first class (background)."),
    mode: str = typer.Option("single", help="single or sliding."),
    stride: Optional[int] = typer.Option(None, help="Sliding stride (mode sliding)."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Segment one image into the given classes: the image with the label map overlaid and a legend."""
    _setup_logging(False)

    def go():
        from spar_pipeline import tools

        if mode == "sliding" and not stride:
            raise _UserError("--mode sliding needs --stride S, e.g. --stride 24")
        out_info = tools.segment_image(image, tools.parse_classes(classes), out, backbone=backbone,
                                       checkpoint=checkpoint, run=_tool_run(run, storage_options),
                                       logit_scale=logit_scale, prob_thd=prob_thd, mode=mode, stride=stride)
        typer.echo(f"segment: wrote {out_info['out']} (classes present: {', '.join(out_info['present']) or 'none'})")

    _guarded(go)


@app.command()
def features(
    image: str = ImageArg,
    out: str = typer.Option(..., "--out", help="FILE.npy to write (float32 h × w × D, no pickle)."),
    checkpoint: str = CkptOpt,
    run: Optional[str] = ToolRunOpt,
    backbone: Optional[str] = BackboneOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Raw dense features of one single pass on the full image: h × w × D float32, not normalised."""
    _setup_logging(False)

    def go():
        from spar_pipeline import tools

        shape = tools.features(image, out, backbone=backbone, checkpoint=checkpoint, run=_tool_run(run, storage_options))
        typer.echo(f"features: wrote {out} shape {list(shape)}")

    _guarded(go)


@app.command()
def pca(
    image: str = ImageArg,
    out: str = typer.Option("pca.png", "--out", help="PNG to write (teacher left, student right)."),
    run: Optional[str] = ToolRunOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Student weights (default: the run's best, "
                                             "else pretrained)."),
    stride: Optional[int] = typer.Option(None, help="Teacher sliding-window stride (default: the run's "
                                         "extract.stride, else 24)."),
    backbone: Optional[str] = BackboneOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """First three principal components as RGB: teacher (sliding) and student (single pass) on one basis."""
    _setup_logging(False)

    def go():
        from spar_pipeline import tools

        r = _tool_run(run, storage_options)
        s = stride or (r.recipe.extract.stride if r is not None else 24)  # 24: the paper's teacher stride
        info = tools.pca_image(image, out, backbone=backbone, run=r, checkpoint=checkpoint, stride=s)
        typer.echo(f"pca: wrote {info['out']} ({info['size'][0]}×{info['size'][1]}, student: {info['student']})")

    _guarded(go)


def _datasets(items: List[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise _UserError(f"--dataset {item!r}: expected NAME=PATH, e.g. --dataset voc21=data/VOCdevkit/VOC2012")
        out[name.strip()] = path.strip()
    return out


def _gpu_ids(gpus: Optional[str]) -> Optional[list[int]]:
    if not gpus:
        return None
    try:
        return [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise _UserError(f"--gpus {gpus!r}: expected comma-separated GPU ids, e.g. --gpus 0,1") from None


@app.command("run")
def run_cmd(
    sources: List[str] = typer.Argument(None, help="SA-1B tars; none with a tiny recipe generates a small source."),
    run: str = RunOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Preset or TOML path (default tiny-cpu for a new run)."),
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids for extract and train."),
    workers: Optional[int] = typer.Option(None, help="CPU worker processes for extract."),
    scheduler: Optional[str] = typer.Option(None, help="Existing Dask scheduler for extract, e.g. tcp://host:8786."),
    limit: Optional[int] = typer.Option(None, help="Hold at most about N images in the run (a total: reruns add none)."),
    links: Optional[str] = typer.Option(None, help="Official SA-1B links file (file_name<TAB>url), with --tars."),
    tars: Optional[str] = typer.Option(None, help="With --links: comma-separated tar names, e.g. sa_000000,sa_000001."),
    max_id: Optional[int] = typer.Option(None, help="Keep sa_<id> with id ≤ N (recipe default; paper: 25000)."),
    epochs: Optional[int] = typer.Option(None, help="Override the recipe's epochs."),
    dataset: List[str] = typer.Option([], "--dataset", help="NAME=PATH (repeatable): also evaluate pretrained and "
                                      "student, single pass and sliding, on these benchmarks."),
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
        out = run_all(r, list(sources or []), gpus=_gpu_ids(gpus), workers=workers, scheduler=scheduler, limit=limit,
                      epochs=epochs, datasets=_datasets(dataset), links=links,
                      tars=tars.split(",") if tars else None, max_id=max_id)
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
