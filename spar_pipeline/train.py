"""The ``train`` stage: a single-pass student distilled from the stored teacher maps (docs/reference.md).

Every image that is ok in the augment and extract manifests is used, except a held-out slice
(``[train].holdout_fraction``, see split.py) that is never trained on and gives ``val_mse`` each
epoch and ``baseline_val_mse`` once, before the first step. The student is the recipe's backbone
with ``[train].trainable`` unfrozen and the rest frozen by ``requires_grad``, in eval mode
throughout (student.py); it sees the whole augmented image in one pass and regresses the teacher
map with MSE over all elements. AdamW over the trainable parameters, constant LR, one image per
micro-step and ``[train].images_per_step`` images per optimizer step (gradients accumulate, so 1,
2 or 4 processes take the same steps); fp16 (grad scaler) or bf16 autocast on GPU.
``gpus=[0, 1]`` (or ``processes=2`` on CPU, gloo) runs DDP, one process per device
(distributed.py).

Resume goes through ``Trainer.state_dict`` and the checkpointer (interval, retention, atomic
writes, the best student). At each epoch end rank 0 saves the epoch checkpoint, exports the best
student (``checkpoints/best.safetensors``, and ``best_open_clip.safetensors`` in open_clip's key
layout), then writes the epoch's manifest row, which is the completion record (trainer.py).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from spar_pipeline import distributed
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.errors import TrainError
from spar_pipeline.recipe import Recipe, TrainConfig
from spar_pipeline.run import Run
from spar_pipeline.split import training_items
from spar_pipeline.trainer import Trainer, TrainSpec

__all__ = ["run", "summary_line", "TrainError"]

log = logging.getLogger(__name__)


def run(run: Run, *, gpus: list[int] | None = None, epochs: int | None = None, trainable: str | None = None,
        resume: bool = True, processes: int | None = None, progress: bool = True,
        stop_after_steps: int | None = None, images_per_step: int | None = None) -> dict:
    """CLI ``train``. ``gpus``: one DDP process per listed GPU (NCCL); otherwise ``processes`` CPU
    processes (gloo, default 1); their count must divide ``[train].images_per_step`` (the default
    GPU list is cut to the largest count that does). ``resume`` continues from the newest intact
    checkpoint; off, the run's checkpoints, best student and train manifest are cleared first.
    ``stop_after_steps`` stops after that many optimizer steps of this call as a crash would (no
    final checkpoint): for tests and benchmarks. ``epochs``, ``trainable``, ``images_per_step``
    override the recipe's."""
    recipe = _with_overrides(run.recipe, epochs=epochs, trainable=trainable, images_per_step=images_per_step)
    cfg = recipe.train
    gpus, world = _devices(cfg, gpus, processes)
    train_items, val_items = training_items(run)
    if len(train_items) < cfg.images_per_step:
        raise TrainError(f"{len(train_items)} training image(s) for images_per_step={cfg.images_per_step}: "
                         "not one optimizer step; add images or lower images_per_step")
    spec = TrainSpec(url=run.url, storage_options=run.storage_options, recipe=recipe, train_items=train_items,
                     val_items=val_items, gpus=tuple(gpus) if gpus else None, progress=progress,
                     stop_after_steps=stop_after_steps)
    if world > 1:  # a bad spec fails here, once, rather than in every spawned process
        from spar_pipeline.backbones import build

        build(recipe.recipe.backbone, recipe.recipe.checkpoint or None).set_trainable(cfg.trainable)
    if not resume:
        n = Checkpointer(run, dict, every=1).clear()
        if run.exists("manifests", "train"):
            run.fs.rm(run.path("manifests", "train"), recursive=True)
        log.info("train: resume off: %d checkpoint(s), the best student and the train manifest cleared", n)
    log.info("train: %d training and %d held-out images, %d process(es) on %s, %d image(s) per optimizer step",
             len(train_items), len(val_items), world, f"GPUs {spec.gpus}" if gpus else "CPU", cfg.images_per_step)
    if world == 1:
        if gpus:
            torch.cuda.set_device(gpus[0])
        return Trainer(spec).train()
    return distributed.spawn(_train_rank, world, gpus, spec)


def _train_rank(rank: int, world: int, spec: TrainSpec) -> dict:
    return Trainer(spec, rank, world).train()


def _with_overrides(recipe: Recipe, **changes) -> Recipe:
    """The recipe with this call's [train] overrides (None: the recipe's value)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    for key in ("epochs", "images_per_step"):
        if key in changes and changes[key] < 1:
            raise TrainError(f"{key}={changes[key]}: must be ≥ 1")
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **changes))


def _devices(cfg: TrainConfig, gpus: list[int] | None, processes: int | None) -> tuple[list[int] | None, int]:
    """(GPU ids or None for CPU processes, process count), refused in one line when they cannot be used."""
    per_step = cfg.images_per_step
    if cfg.batch_size != 1:
        raise TrainError(f"[train].batch_size={cfg.batch_size}: the method trains with batch size 1 per device "
                         "(images differ in size); set it to 1 and use images_per_step for a larger effective batch")
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


def summary_line(report: dict, best_url: str) -> str:
    """The one line ``spar-pipeline train`` prints: steps, images, held-out MSE, where the best student is."""
    best = report.get("best_val_mse")
    held = (f"held-out MSE best {'None' if best is None else f'{best:.4g}'} vs pretrained "
            f"{report['baseline_val_mse']:.4g}" if report["val_images"] else
            "no held-out slice (holdout_fraction = 0): best = last epoch")
    return (f"train: step {report['step']} ({report['steps_this_run']} this run) on {report['train_images']} images, "
            f"{report['world']} process(es), {report['images_per_step']} image(s) per step; {held}; "
            f"data wait {report['data_wait_share']:.1%}; best student: {best_url}")
