"""The ``train`` stage: a single-pass student distilled from the stored teacher maps (docs/reference.md).

A run holds many students (``RUN/students/<name>/``, run.py), each over one teacher's maps and
with its settings frozen in its student.toml. Every image that is ok in the augment manifest and
its teacher's extract manifest is used (or ``images`` of them, a nested seeded subset), except a held-out slice
(``[train].holdout_fraction``, see split.py) that is never trained on and gives ``val_mse`` each
epoch and ``baseline_val_mse`` once, before the first step. The student is the recipe's backbone
with ``[train].trainable`` unfrozen and the rest frozen by ``requires_grad``, in eval mode
throughout (student.py); it sees the whole augmented image in one pass and regresses the teacher
map with MSE over all elements. AdamW over the trainable parameters, constant LR, one image per
micro-step and ``[train].images_per_step`` images per optimizer step (gradients accumulate, so 1,
2 or 4 processes take the same steps); fp16 (grad scaler) or bf16 autocast on GPU.
``gpus=[0, 1]`` (or ``processes=2`` on CPU, gloo) runs DDP, one process per device
(distributed.py). Under ``torchrun`` (``torchrun ... -m spar_pipeline.train -- --run URL``, one or
many machines) each process is one rank of torchrun's group instead (docs/multinode.md).

Resume goes through ``Trainer.state_dict`` and the checkpointer (interval, retention, atomic
writes, the best student). At each epoch end rank 0 saves the epoch checkpoint, exports the best
student (``RUN/students/<name>/checkpoints/best.safetensors``, and ``best_open_clip.safetensors`` in open_clip's key
layout), then writes the epoch's manifest row, which is the completion record (trainer.py).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from spar_pipeline import distributed
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.errors import TrainError
from spar_pipeline.recipe import TrainConfig, train_config
from spar_pipeline.run import DEFAULT, STUDENT_FILE, Run, StudentFolder
from spar_pipeline.split import training_items
from spar_pipeline.trainer import Trainer, TrainSpec

__all__ = ["run", "summary_line", "processes_here", "TrainError"]

log = logging.getLogger(__name__)


def run(run_dir: Run, *, gpus: list[int] | None = None, epochs: int | None = None, trainable: str | None = None,
        resume: bool = True, processes: int | None = None, progress: bool = True,
        stop_after_steps: int | None = None, images_per_step: int | None = None, student: str = "default",
        teacher: str | None = None, seed: int | None = None, images: int | None = None,
        lr: float | None = None, settings: dict | None = None) -> dict:
    """CLI ``train``. ``gpus``: one DDP process per listed GPU (NCCL); otherwise ``processes`` CPU
    processes (gloo, default 1); their count must divide ``[train].images_per_step`` (the default
    GPU list is cut to the largest count that does). ``resume`` continues from the newest intact
    checkpoint; off, the run's checkpoints, best student and train manifest are cleared first.
    ``stop_after_steps`` stops after that many optimizer steps of this call as a crash would (no
    final checkpoint): for tests and benchmarks.

    ``student`` names the training (``RUN/students/<name>/``). Its first call freezes its settings in
    student.toml: the recipe's [train] with this call's ``epochs``, ``trainable``, ``images_per_step``,
    ``lr``, and ``teacher`` (whose maps it learns), ``seed`` (its epoch order; default the recipe's)
    and ``images`` (N images of the training split, ``split.nested_subset``; default all), and any other
    [train] key in ``settings`` (a [[students]] table's; the named arguments win). Later calls
    resume it; one that gives another value is refused naming the keys, except ``epochs``, which may
    grow (train further). ``resume`` off starts the student over: its folder is cleared and the
    settings frozen anew."""
    named = dict(teacher=teacher, trainable=trainable, seed=seed, images=images, lr=lr, epochs=epochs,
                 images_per_step=images_per_step)
    folder, settings = _settings(run_dir, student, resume, {**(settings or {}), **{k: v for k, v in named.items()
                                                                               if v is not None}})
    recipe = run_dir.recipe
    recipe = dataclasses.replace(recipe, train=train_config(recipe.train, settings, f"student {student}"))
    cfg = recipe.train
    where = distributed.launched()  # torchrun started this process: it is one rank of torchrun's group
    gpus, world = _devices(cfg, gpus, processes) if where is None else (None, _torchrun_world(cfg, where, gpus,
                                                                                             processes))
    if where is not None and where.rank:
        logging.getLogger("spar_pipeline").setLevel(logging.WARNING)  # rank 0 tells the story
    train_items, val_items = training_items(run_dir, settings["teacher"], settings["images"])
    settings["images"] = len(train_items)
    if len(train_items) < cfg.images_per_step:
        raise TrainError(f"{len(train_items)} training image(s) for images_per_step={cfg.images_per_step}: "
                         "not one optimizer step; add images or lower images_per_step")
    spec = TrainSpec(url=run_dir.url, storage_options=run_dir.storage_options, recipe=recipe, train_items=train_items,
                     val_items=val_items, gpus=tuple(gpus) if gpus else None, progress=progress,
                     stop_after_steps=stop_after_steps, student=folder.name, teacher=settings["teacher"],
                     seed=settings["seed"], settings=settings)
    if world > 1 and where is None:  # a bad spec fails here, once, rather than in every spawned process
        from spar_pipeline.backbones import build

        build(recipe.recipe.backbone, recipe.recipe.checkpoint or None).set_trainable(cfg.trainable)
    if not resume and (where is None or where.rank == 0):
        n = Checkpointer(folder, dict, every=1).clear()
        for part in (("manifests", "train"), (STUDENT_FILE,)):
            if folder.exists(*part):
                folder.fs.rm(folder.path(*part), recursive=True)
        log.info("train: resume off: student %s started over (%d checkpoint(s), the best student, the train "
                 "manifest and student.toml cleared)", folder.name, n)
    log.info("train: student %s over teacher %s: %d training and %d held-out images, %d process(es) on %s, "
             "%d image(s) per optimizer step", folder.name, settings["teacher"], len(train_items), len(val_items),
             world, _where(gpus, where), cfg.images_per_step)
    if where is not None:
        return _train_launched(spec, where)
    if world == 1:
        if gpus:
            torch.cuda.set_device(gpus[0])
        return Trainer(spec).train()
    return distributed.spawn(_train_rank, world, gpus, spec)


def _train_rank(rank: int, world: int, spec: TrainSpec) -> dict:
    return Trainer(spec, rank, world).train()


def _train_launched(spec: TrainSpec, where: distributed.Launched) -> dict:
    """One torchrun process: join its group (env://), train its rank's share, leave."""
    distributed.init_launched(where)
    try:
        report = Trainer(spec, where.rank, where.world).train()
        distributed.settle()
        return report
    except RuntimeError as e:
        why = distributed.peer_lost(e)
        if why is None:
            raise
        raise TrainError(f"rank {where.rank} of {where.world}: another training process died or stopped answering "
                         f"({why}); rerun the same command on every node to resume from the newest checkpoint") from e
    finally:
        distributed.leave()


def _where(gpus: list[int] | None, where: distributed.Launched | None) -> str:
    if where is not None:
        return f"torchrun ({where.local_world} here, {'cuda:LOCAL_RANK' if torch.cuda.is_available() else 'CPU'})"
    return f"GPUs {tuple(gpus)}" if gpus else "CPU"


def _torchrun_world(cfg: TrainConfig, where: distributed.Launched, gpus: list[int] | None,
                    processes: int | None) -> int:
    """torchrun's WORLD_SIZE, refused in one line when it does not divide images_per_step (also on a
    resume with another node count: the checkpoint keeps images_per_step, the world may change)."""
    if gpus or processes is not None:
        raise TrainError("--gpus/--processes under torchrun: torchrun starts the processes (--nnodes x "
                         "--nproc-per-node, one per GPU with CUDA); leave both out")
    _one_image_per_device(cfg)
    per_step = cfg.images_per_step
    if per_step % where.world:
        divisors = [d for d in range(1, per_step + 1) if per_step % d == 0]
        raise TrainError(f"torchrun's WORLD_SIZE={where.world} (nodes x processes per node) does not divide "
                         f"[train].images_per_step={per_step}: use {' or '.join(map(str, divisors))} processes in all "
                         "(each accumulates images_per_step / WORLD_SIZE images per optimizer step)")
    return where.world


def processes_here(run: Run, gpus: list[int] | None = None, processes: int | None = None,
                   images_per_step: int | None = None) -> tuple[list[int] | None, int]:
    """(GPU ids or None for the CPU, process count) that ``run(...)`` would start on this machine:
    what ``spar-pipeline train --launcher torchrun`` asks torchrun for."""
    per_step = images_per_step or run.recipe.train.images_per_step
    return _devices(dataclasses.replace(run.recipe.train, images_per_step=per_step), gpus, processes)


def _settings(run: Run, name: str, resume: bool, given: dict) -> tuple[StudentFolder, dict]:
    """(student ``name``'s folder, its settings): the frozen ones with this call's grown epochs, or on
    first use (or ``resume`` off) the recipe's [train] with what is given (None: not given)."""
    given = {k: v for k, v in given.items() if v is not None}
    for key in ("epochs", "images_per_step", "images"):
        if key in given and given[key] < 1:
            raise TrainError(f"{key}={given[key]}: must be ≥ 1")
    if given.get("holdout_fraction", run.recipe.train.holdout_fraction) != run.recipe.train.holdout_fraction:
        raise TrainError(f"student {name}: holdout_fraction={given['holdout_fraction']}: the held-out slice is the "
                         f"run's ([train].holdout_fraction={run.recipe.train.holdout_fraction}), the same for every "
                         "student so that their val_mse compare")
    folder = run.student(name)
    base = {**dataclasses.asdict(run.recipe.train), "teacher": DEFAULT, "images": None, "seed": run.recipe.recipe.seed}
    settings = folder.plan(base, given) if resume else {**base, **given}
    if settings["epochs"] != (folder.settings or {}).get("epochs", settings["epochs"]):
        log.info("train: student %s: epochs %d -> %d (epochs may grow; its other settings stay frozen)", name,
                 folder.settings["epochs"], settings["epochs"])
    return folder, settings


def _devices(cfg: TrainConfig, gpus: list[int] | None, processes: int | None) -> tuple[list[int] | None, int]:
    """(GPU ids or None for CPU processes, process count), refused in one line when they cannot be used."""
    per_step = cfg.images_per_step
    _one_image_per_device(cfg)
    if not gpus and processes is None:
        from spar_pipeline.devices import default_gpus

        gpus = list(default_gpus()) or None  # a GPU machine trains on its GPUs unless told --processes N
        if gpus and per_step % len(gpus):
            n = max(d for d in range(1, len(gpus) + 1) if per_step % d == 0)
            log.info("train: %d of this machine's %d GPUs (the largest count dividing images_per_step=%d)",
                     n, len(gpus), per_step)
            gpus = gpus[:n]
    if gpus:
        if not torch.cuda.is_available() or max(gpus) >= torch.cuda.device_count():
            raise TrainError(f"--gpus {','.join(map(str, gpus))}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s); leave --gpus out to train on CPU")
        world = len(gpus)
    else:
        world = 1 if processes is None else processes
    if world < 1:
        raise TrainError(f"processes={processes}: must be ≥ 1")
    if per_step % world:
        divisors = [d for d in range(1, per_step + 1) if per_step % d == 0]
        raise TrainError(f"{world} {'GPUs' if gpus else 'processes'} do not divide [train].images_per_step="
                         f"{per_step}: use {' or '.join(map(str, divisors))} (each process accumulates "
                         "images_per_step / processes images per optimizer step)")
    return gpus, world


def _one_image_per_device(cfg: TrainConfig) -> None:
    if cfg.batch_size != 1:
        raise TrainError(f"[train].batch_size={cfg.batch_size}: the method trains with batch size 1 per device "
                         "(images differ in size); set it to 1 and use images_per_step for a larger effective batch")


def summary_line(report: dict, best_url: str) -> str:
    """The one line ``spar-pipeline train`` prints: steps, images, held-out MSE, where the best student is."""
    best = report.get("best_val_mse")
    held = (f"held-out MSE best {'None' if best is None else f'{best:.4g}'} vs pretrained "
            f"{report['baseline_val_mse']:.4g}" if report["val_images"] else
            "no held-out slice (holdout_fraction = 0): best = last epoch")
    return (f"train: step {report['step']} ({report['steps_this_run']} this run) on {report['train_images']} images, "
            f"{report['world']} process(es), {report['images_per_step']} image(s) per step; {held}; "
            f"data wait {report['data_wait_share']:.1%}; best student: {best_url}")


if __name__ == "__main__":  # `torchrun ... -m spar_pipeline.train -- --run URL ...`: each process runs `train`
    import os
    import sys

    from spar_pipeline.cli import app

    argv = sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]  # torchrun drops the `--`, python keeps it
    try:
        app([*(["--verbose"] if "--verbose" in argv else []), "train", *(a for a in argv if a != "--verbose")],
            prog_name="python -m spar_pipeline.train")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    # Every checkpoint and report is written and the group left by now. Under load a gloo rank still aborted in
    # the interpreter's teardown ("terminate called without an active exception": a C++ thread destroyed while
    # joinable), failing a finished run; leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
