"""The stage commands: ingest, augment, extract, train, evaluate, report, run (all of them), migrate, verify, status.

Each loads the run and calls its stage; every stage reads the previous stage's manifest, does only
what is not done yet and can be rerun after any failure to finish the rest.
"""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console

from spar_pipeline.cli.common import (Count, Mode, RecipeOpt, RunOpt, StorageOpt, app, console, datasets, gpu_ids,
                                      names, one_of, open_run, reporting, scheduler_ok)
from spar_pipeline.cli.launcher import Launcher, rank_zero, run_torchrun
from spar_pipeline.checkpoint_names import BEST
from spar_pipeline.errors import OptionError, SourceError

TarsOpt = typer.Option(None, help="With --links: comma-separated tar names, e.g. sa_000000,sa_000001.")
MaxIdOpt = Count(None, minimum=0, help="Keep sa_<id> with id ≤ N (recipe default; paper: 25000).")
EpochsOpt = Count(None, help="Override the recipe's epochs.")


def _links(links: Optional[str], tars: Optional[str]) -> Optional[list[str]]:
    if tars is not None and not links:
        raise OptionError("--tars names tars of an official links file: give --links FILE too")
    return names("--tars", tars, "sa_000000,sa_000001")


@app.command()
def ingest(
    sources: List[str] = typer.Argument(None, help="Tars (SA-1B sa_NNNNNN.tar, or WebDataset shards), image files "
                                        "(jpg/png/webp), folders (searched recursively), globs; paths or fsspec URLs."),
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    max_id: Optional[int] = MaxIdOpt,
    limit: Optional[int] = Count(None, help="Stop after about N new images."),
    links: Optional[str] = typer.Option(None, help="Official SA-1B links file (file_name<TAB>url)."),
    tars: Optional[str] = TarsOpt,
    dataset: List[str] = typer.Option([], "--dataset", help="NAME=PATH (repeatable): the train split of ade20k, "
                                      "cityscapes or voc in its mmseg layout (labels unused)."),
    sample: Optional[int] = Count(None, help="Keep a seeded subset of N images of all the sources (nested in a "
                                  "larger N, stable as the sources grow)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --sample."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Index tars and image files in place and validate every image.

    Reads: the tars (never extracted) and image files. Writes: RUN/manifests/ingest/ (one row per
    image: its tar or file, byte offset, size, checksum, status). Resume: tars and files already in
    the manifest are skipped; a grown folder adds only its new files.
    """
    with reporting():
        from spar_pipeline import ingest as stage

        tar_names = _links(links, tars)
        if not sources and not links and not dataset:
            raise OptionError("give tars, image files, folders or globs (paths or URLs), --dataset NAME=PATH, "
                              "or --links FILE --tars NAMES")
        r = open_run(run, recipe, storage_options)
        report = stage.run(r, list(sources or []), links=links, tars=tar_names, datasets=list(dataset), sample=sample,
                           seed=seed, max_id=max_id, limit=limit, storage_options=r.storage_options)
        console.print(f"ingest: {report}")
        if report["failed_tars"] + report["failed_images"] and not any(
                report[k] for k in ("ok", "rejected", "duplicates", "skipped_tars", "skipped_images")):
            raise SourceError("ingest: no source could be read (the lines above say why); nothing ingested")


@app.command()
def augment(
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    limit: Optional[int] = Count(None, help="Draw at most N new images."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Draw each image's augmentation once (a pure function of seed and image id).

    Reads: the ingest manifest. Writes: RUN/manifests/augment/ (resize, crop box, flip, final size).
    Resume: images already drawn are skipped.
    """
    with reporting():
        from spar_pipeline import augment as stage

        r = open_run(run, recipe, storage_options)
        console.print(f"augment: {stage.run(r, limit=limit)}")


@app.command()
def extract(
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids: one worker process per GPU "
                                       "(default: every GPU of this machine)."),
    workers: Optional[int] = Count(None, help="CPU worker processes instead (default on a machine "
                                          "without GPUs: 1)."),
    scheduler: Optional[str] = typer.Option(None, help="Use an existing Dask scheduler, e.g. tcp://host:8786."),
    window_batch: Optional[int] = Count(None, help="Windows per forward (recipe default)."),
    limit: Optional[int] = Count(None, help="Extract at most N new images."),
    teacher: str = typer.Option("default", "--teacher", help="Teacher name: another store over the same images "
                                "(default: the recipe's [extract])."),
    stride: Optional[int] = Count(None, help="Teacher stride s, frozen in the teacher's teacher.toml on its first "
                                  "extract (recipe default)."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Run the sliding-window teacher and store one float16 map per image.

    Reads: augment manifest + tars. Writes: RUN/teachers/NAME/ (teacher.toml, features.zarr, manifests/extract/:
    a row only after its map is fully written). Resume: images with a row are skipped; a dead worker costs one
    batch. Another --teacher never touches the first; the same name with another --stride is refused.
    """
    with reporting():
        from spar_pipeline import extract as stage

        one_of(gpus=gpus, workers=workers, scheduler=scheduler)
        ids = gpu_ids(gpus)
        scheduler_ok(scheduler)
        r = open_run(run, recipe, storage_options)
        report = stage.run(r, gpus=ids, workers=workers, scheduler=scheduler, window_batch=window_batch, limit=limit,
                           teacher=teacher, stride=stride)
        console.print(f"extract: {report}")


@app.command()
def train(
    ctx: typer.Context,
    run: str = RunOpt,
    recipe: Optional[str] = RecipeOpt,
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids: one DDP process per GPU (NCCL; "
                                       "default: every GPU of this machine)."),
    processes: Optional[int] = Count(None, help="CPU data-parallel processes instead (gloo; default 1 "
                                            "on a machine without GPUs)."),
    student: str = typer.Option("default", "--student", help="Student name: its settings are frozen in "
                                "RUN/students/NAME/student.toml on its first train; the same name resumes."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The teacher whose maps it learns (default: "
                                          "default)."),
    epochs: Optional[int] = Count(None, help="Override the recipe's epochs (a student may grow it to train further)."),
    trainable: Optional[str] = typer.Option(None, help="Parameters to train, e.g. blk_-1,blk_-2 (recipe default)."),
    seed: Optional[int] = Count(None, "--seed", minimum=0, help="Seed of its epoch order (recipe default)."),
    images: Optional[int] = Count(None, help="Train on N images of the run's training split (a seeded subset, the "
                                  "same for every student, nested in a larger N; default all)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (recipe default)."),
    images_per_step: Optional[int] = Count(None, help="Images per optimizer step (recipe default)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest intact checkpoint "
                                "(default), or start the student over: its checkpoints, train manifest and "
                                "student.toml cleared first."),
    storage_options: Optional[str] = StorageOpt,
    launcher: Launcher = typer.Option(Launcher.spawn, help="spawn: this command starts the processes; torchrun: "
                                      "print and run `torchrun --standalone --nnodes 1 --nproc-per-node N -m "
                                      "spar_pipeline.train ...` (one machine of a multi-node job: docs/multinode.md)."),
) -> None:
    """Distil the student: single pass on each augmented image, MSE against its stored teacher map.

    Reads: the augment manifest, the tars, RUN/teachers/TEACHER/ (store and extract manifest). Writes:
    RUN/students/NAME/ (student.toml; checkpoints/: step and epoch checkpoints, best.safetensors,
    best_open_clip.safetensors; manifests/train/: a row per epoch with val_mse). Resume: rerun continues from
    the newest intact checkpoint; the same --student with other settings is refused naming them (--epochs
    may grow).
    """
    with reporting():
        from spar_pipeline import train as stage

        one_of(gpus=gpus, processes=processes)
        ids = gpu_ids(gpus)
        if trainable is not None and not trainable.strip():
            raise OptionError("--trainable '': expected parameters to train, e.g. --trainable blk_-1,blk_-2")
        r = open_run(run, recipe, storage_options)
        if launcher is Launcher.torchrun:
            return run_torchrun(ctx, *stage.processes_here(r, ids, processes, images_per_step))
        if lr is not None and not lr > 0:
            raise OptionError(f"--lr {lr}: must be > 0")
        rep = stage.run(r, gpus=ids, epochs=epochs, trainable=trainable, resume=resume, processes=processes,
                        student=student, teacher=teacher, seed=seed, images=images, lr=lr,
                        images_per_step=images_per_step)
        if rank_zero():  # under torchrun every process returns; one line is printed
            typer.echo(stage.summary_line(rep, r.student(student).url_for("checkpoints", BEST)))


@app.command()
def evaluate(
    dataset: List[str] = typer.Option([], "--dataset", help="NAME=PATH, repeatable; NAME in voc21, voc20, context60, "
                                      "context59, ade20k, cityscapes (or scenes, the miniature world's); PATH the "
                                      "dataset root in the mmseg layout. "
                                      "None: the held-out teacher MSE of each checkpoint (needs --run)."),
    run: Optional[str] = typer.Option(None, "--run", help="Run folder (its recipe, students and reports)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Preset or TOML path when there is no --run."),
    checkpoint: List[str] = typer.Option(["pretrained"], "--checkpoint", help="pretrained, a student's name (its "
                                         "best epoch; best = the default student) or a weights file; repeatable "
                                         "to compare several models in one call."),
    mode: List[Mode] = typer.Option([Mode.single], "--mode", help="single and/or sliding (repeatable)."),
    stride: List[int] = Count([], "--stride", help="Sliding stride(s), repeatable (recipe default)."),
    scale: List[float] = typer.Option([], "--scale", help="Resolution factor F > 0, repeatable: images resized "
                                      "to F × the recipe's evaluation size, timed at F × its timing_size (default 1)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone name overriding the recipe's."),
    limit: Optional[int] = Count(None, help="First N images of each dataset."),
    redo: bool = typer.Option(False, "--redo", help="Evaluate again rows already in the manifest."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Open-vocabulary mIoU on the benchmarks, single pass and/or sliding window, with seconds per image.

    Reads: the datasets, the checkpoint(s). Writes (with --run): RUN/manifests/evaluate/ (a row per model,
    mode, stride, scale, dataset, with per-class IoU) and RUN/reports/table.md + table.csv. Resume: rows
    already there are skipped.
    """
    with reporting():
        from spar_pipeline import evaluate as stage

        benchmarks, modes = datasets(dataset), [m.value for m in mode]
        if not benchmarks and run is None:
            raise OptionError("give --dataset NAME=PATH, or --run RUN for the held-out teacher MSE of each checkpoint")
        if stride and "sliding" not in modes:
            raise OptionError(f"--stride {stride[0]} applies to --mode sliding only; add --mode sliding")
        if scale and not benchmarks:
            raise OptionError(f"--scale {scale[0]:g} applies to benchmarks only; add --dataset NAME=PATH")
        r = open_run(run, recipe, storage_options) if run else None
        if not benchmarks:
            from spar_pipeline.heldout import heldout_mse

            for ck, mse in heldout_mse(r, checkpoint, backbone=backbone):
                typer.echo(f"{ck:>12} held-out teacher MSE {mse:.6g}")
            return
        rows = stage.run(r, benchmarks, checkpoints=checkpoint, modes=modes, strides=stride or None,
                         scales=scale or (1.0,), limit=limit, backbone=backbone,
                         recipe=None if r is not None else recipe, redo=redo)
        for row in rows:
            s = (f" s={row['stride']}" if row["stride"] else "") + (f" ×{row['scale']:g}" if row["scale"] != 1 else "")
            typer.echo(f"{row['model']:>12} {row['mode']}{s:<11} {row['dataset']:<11} mIoU {row['miou']:6.2f}  "
                       f"{row['predict_seconds']:.4f} s/image end to end, forward {row['forward_seconds']:.4f} s "
                       f"@{row['forward_height']}×{row['forward_width']}  ({row['images']} images)")
        if r is not None:
            typer.echo(f"table: {r.url_for('reports', 'table.md')}")


@app.command("run")
def run_cmd(
    sources: List[str] = typer.Argument(None, help="SA-1B tars; none with a tiny recipe generates a small source."),
    run: str = RunOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Preset or TOML path (default tiny-cpu for a new run)."),
    gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids for extract and train."),
    workers: Optional[int] = Count(None, help="CPU worker processes for extract."),
    scheduler: Optional[str] = typer.Option(None, help="Existing Dask scheduler for extract, e.g. tcp://host:8786."),
    limit: Optional[int] = Count(None, help="Hold at most about N images in the run (a total: reruns "
                                        "add none)."),
    links: Optional[str] = typer.Option(None, help="Official SA-1B links file (file_name<TAB>url), with --tars."),
    tars: Optional[str] = TarsOpt,
    max_id: Optional[int] = MaxIdOpt,
    epochs: Optional[int] = EpochsOpt,
    dataset: List[str] = typer.Option([], "--dataset", help="NAME=PATH (repeatable): also evaluate pretrained "
                                      "(single pass and sliding) and the students (single pass) on these benchmarks."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Run every stage in order, each resuming, and write RUN/reports/summary.md.

    Stopped at any point and run again, it finishes what is left.
    """
    with reporting():
        from spar_pipeline.pipeline import run_all

        one_of(gpus=gpus, workers=workers, scheduler=scheduler)
        ids, tar_names, benchmarks = gpu_ids(gpus), _links(links, tars), datasets(dataset)
        scheduler_ok(scheduler)
        r = open_run(run, recipe, storage_options, default="tiny-cpu")
        out = run_all(r, list(sources or []), gpus=ids, workers=workers, scheduler=scheduler, limit=limit,
                      epochs=epochs, datasets=benchmarks, links=links, tars=tar_names, max_id=max_id)
        typer.echo(out["summary"])


@app.command()
def report(
    run: str = RunOpt,
    dataset: List[str] = typer.Option([], "--dataset", help="NAME=PATH (repeatable): benchmarks the Fig. 5/7 pictures "
                                      "may show (a mini run uses its own scenes)."),
    student: List[str] = typer.Option([], "--student", help="A student shown in Fig. 5/7 (repeatable; default: up "
                                      "to three with weights, best mean mIoU first)."),
    images: int = Count(3, help="Benchmark images in Fig. 5/7."),
    pictures: bool = typer.Option(True, "--pictures/--no-pictures", help="Draw Fig. 5/7 when missing (runs the "
                                  "models), or leave them out."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """The study report: RUN/reports/index.html, tables.md + tables.csv and figures/*.png.

    Reads: the evaluate manifest, each student's student.toml and train manifest, each teacher's teacher.toml
    (models only for a missing Fig. 5/7). Writes: RUN/reports/. Resume: rewritten from the manifests on every
    call; Fig. 5/7 are drawn again only when what they show changed.
    """
    with reporting():
        from spar_pipeline.study import write_report

        r = open_run(run, None, storage_options)
        benchmarks = datasets(dataset)
        if not benchmarks and pictures:
            from spar_pipeline.mini import demo

            if demo.is_mini(r) and "scenes" in r.recipe.evaluate.datasets:
                benchmarks = demo.embedded_benchmark(r)
        out = write_report(r, datasets=benchmarks, students=list(student) or None, images=images, pictures=pictures)
        for line in out["notes"]:
            typer.echo(f"note: {line}")
        typer.echo(f"report: {out['index']}")


@app.command()
def migrate(
    run: str = RunOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Move a run of the older layout (RUN/features.zarr, RUN/checkpoints/ at its top) into teachers/default
    and students/default, writing their teacher.toml and student.toml.

    Reads: run.toml, the train manifest and the newest checkpoint. Writes: RUN/teachers/default/,
    RUN/students/default/. Resume: what is already moved stays; a run of the current layout is left as it is.
    """
    with reporting():
        from spar_pipeline.migrate import migrate as move

        for line in move(open_run(run, None, storage_options)):
            typer.echo(f"migrate: {line}")


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
    with reporting():
        from spar_pipeline.verify import verify as check

        report = check(open_run(run, None, storage_options), repair=repair)
        typer.echo(f"verify: {report}")
        damaged = sum(v["damaged"] for v in report.values() if isinstance(v, dict))
        if damaged and not repair:
            raise typer.Exit(1)


@app.command()
def status(
    run: str = RunOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Per stage: planned, done, rejected, pending, bytes and throughput, read from the manifests only."""
    with reporting():
        from spar_pipeline import status as stage

        stage.print_status(open_run(run, None, storage_options), Console())
