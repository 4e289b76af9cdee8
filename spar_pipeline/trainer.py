"""One process's training loop: the student, its share of the data, the state, the checkpointer.

``Trainer.train`` reads top to bottom: resume, the pretrained baseline, then per epoch one
``student.train_step`` per image of this process's share, ``checkpointer.save(step)`` after each
optimizer step, and at the epoch end validation, the epoch checkpoint, the best student and the
epoch's manifest row (the completion record), in that order. What a checkpoint restores besides
the weights, optimizer and RNG is :class:`TrainState`: epoch, position, step and the epoch's
accumulators. Rank 0 writes; every rank takes part in the collectives (distributed.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch

from spar_pipeline import distributed, manifest
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.devices import matmul_precision_for, torch_device
from spar_pipeline.errors import TrainError
from spar_pipeline.pairs import PairLoader
from spar_pipeline.progress import StageProgress
from spar_pipeline.recipe import Recipe
from spar_pipeline.run import Run
from spar_pipeline.split import Item, epoch_order, rank_share
from spar_pipeline.student import Student

__all__ = ["TrainSpec", "TrainState", "Trainer"]

log = logging.getLogger("spar_pipeline.train")  # the stage's messages, under the stage's name

LOG_EVERY = 10  # optimizer steps between progress-line updates (each one syncs the device once)


@dataclass(frozen=True)
class TrainSpec:
    """Everything a process needs; plain data so it crosses a spawn. ``recipe.train`` already
    carries the student's settings (its student.toml: the recipe's [train] with its overrides).
    ``student``/``teacher``: the folders it writes to and reads maps from; ``seed``: its epoch order
    (None: the recipe's); ``settings``: what rank 0 freezes in student.toml once the model is built."""

    url: str
    storage_options: dict
    recipe: Recipe
    train_items: list[Item]
    val_items: list[Item]
    gpus: tuple[int, ...] | None = None
    progress: bool = True
    stop_after_steps: int | None = None
    keep_latest_k: int = 2
    student: str = "default"
    teacher: str = "default"
    seed: int | None = None
    settings: dict | None = None


@dataclass
class TrainState:
    """Where training stands: epoch, this process's position (micro-steps) in it, optimizer steps,
    the epoch's accumulators and the held-out figures. Its ``state_dict`` is what a checkpoint keeps."""

    epoch: int = 0
    position: int = 0
    step: int = 0
    loss_sum: Any = 0.0  # this process's summed image losses this epoch (a device scalar: no sync per step)
    loss_images: int = 0
    seconds: float = 0.0  # this epoch's time so far, and the part of it spent waiting for data
    wait: float = 0.0
    baseline_val_mse: float | None = None
    best_val_mse: float = math.inf
    last_val_mse: float | None = None

    def add(self, loss: torch.Tensor) -> None:
        """One image trained (a micro-step)."""
        self.loss_sum, self.loss_images, self.position = self.loss_sum + loss, self.loss_images + 1, self.position + 1

    def reset_epoch(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_images, self.seconds, self.wait = 0, 0.0, 0.0

    def state_dict(self, world: int, images_per_step: int, loss: tuple[float, int]) -> dict[str, Any]:
        """``loss``: the epoch's (loss sum, images) over all processes."""
        return dict(
            progress=dict(epoch=self.epoch, position=self.position, step=self.step, world=world,
                          images_per_step=images_per_step),
            epoch_acc=dict(loss_sum=loss[0], loss_steps=int(loss[1]), seconds=self.seconds, wait=self.wait),
            metrics=dict(baseline_val_mse=self.baseline_val_mse, best_val_mse=self.best_val_mse,
                         last_val_mse=self.last_val_mse),
        )

    def load_state_dict(self, state: dict[str, Any], world: int, rank: int, device: torch.device) -> None:
        prog, acc, m = state["progress"], state["epoch_acc"], state["metrics"]
        self.epoch, self.step = prog["epoch"], prog["step"]
        # The epoch prefix consumed so far is position·world images (whole optimizer steps, so any world
        # that divides images_per_step re-cuts it exactly); re-cut it for this world size.
        consumed = prog["position"] * prog["world"]
        self.position = consumed // world
        if consumed % world:
            log.warning("resuming with %d processes instead of %d: %d image(s) of epoch %d are trained again",
                        world, prog["world"], consumed % world, self.epoch)
        self.reset_epoch(device)
        if rank == 0:  # the saved sums are global; only rank 0 carries them on
            self.loss_sum += acc["loss_sum"]
            self.loss_images = acc["loss_steps"]
        self.seconds, self.wait = acc["seconds"], acc["wait"]
        self.baseline_val_mse, self.best_val_mse, self.last_val_mse = (m["baseline_val_mse"], m["best_val_mse"],
                                                                       m["last_val_mse"])


@dataclass
class _Clock:
    """This call's steps and time (not checkpointed): throughput and the data-wait share."""

    steps: int = 0
    seconds: float = 0.0
    wait: float = 0.0
    first_wait: float | None = None  # includes starting the loader workers
    seen: list[int] = field(default_factory=list)  # this process's images of the current epoch, in order


def _digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, spec: TrainSpec, rank: int = 0, world: int = 1):
        from spar_pipeline.backbones import build

        self.spec, self.cfg, self.rank, self.world = spec, spec.recipe.train, rank, world
        self.device = torch_device(spec.gpus[rank] if spec.gpus else distributed.local_gpu())  # torchrun: LOCAL_RANK
        self.run = Run(spec.url, spec.storage_options)
        self.folder = self.run.student(spec.student)  # its checkpoints and train manifest
        info = spec.recipe.recipe
        self.student = Student(build(info.backbone, info.checkpoint or None), self.cfg.trainable, lr=self.cfg.lr,
                               weight_decay=self.cfg.weight_decay, precision=self.cfg.precision, device=self.device,
                               accumulate=self.cfg.images_per_step // world, ddp=world > 1)
        if rank == 0 and spec.settings is not None:  # the model took the settings: freeze them
            self.folder.freeze(spec.settings, trainable_params=self.student.n_trainable)
        self.checkpointer = Checkpointer(self.folder, self.state_dict, every=self.cfg.checkpoint_every,
                                         keep_latest_k=spec.keep_latest_k, enabled=rank == 0)
        loader = partial(PairLoader, store_url=self.run.teacher(spec.teacher).store_url, storage_options=spec.storage_options,
                         max_pixels=spec.recipe.ingest.max_pixels, workers=self.cfg.loader_workers,
                         pin_memory=self.device.type == "cuda")
        self.train_data, self.val_data = loader(spec.train_items), loader(spec.val_items)
        self.train_ids = sorted(it.image_id for it in spec.train_items)
        self.state, self.clock = TrainState(), _Clock()
        self.state.reset_epoch(self.device)

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """The whole loop under training's float32 matmul precision ("medium" on a GPU), restored after."""
        with matmul_precision_for(self.device):
            return self._train()

    def _train(self) -> dict[str, Any]:
        started, s = time.time(), self.state
        self.resume()
        if s.baseline_val_mse is None and self.spec.val_items:
            s.baseline_val_mse = self.validate()
            log.info("train: baseline val_mse %.6g (pretrained, single pass) on %d held-out images",
                     s.baseline_val_mse, len(self.spec.val_items))
        total = self.cfg.epochs * (len(self.train_ids) // self.cfg.images_per_step)
        with StageProgress("train", total, enabled=self.spec.progress and self.rank == 0, done=s.step) as bar:
            info = ""
            for epoch in range(s.epoch, self.cfg.epochs):
                s.epoch, tick = epoch, time.perf_counter()
                with contextlib.closing(self.batches(epoch)) as batches:  # closing stops the loader workers
                    for image_id, img, teacher in batches:
                        loss, stepped = self.student.train_step(img, teacher, key=image_id)
                        s.add(loss)
                        if not stepped:  # gradients accumulate until images_per_step images are in
                            continue
                        s.step += 1
                        self.clock.steps += 1
                        self.checkpointer.save(s.step)
                        tick = self._tick(tick)
                        info = self._info(loss) if self.clock.steps % LOG_EVERY == 0 else info
                        bar.update(1, info=info)
                        if self.spec.stop_after_steps and self.clock.steps >= self.spec.stop_after_steps:
                            return self.report(stopped=True)  # as a crash would: no further checkpoint
                self.end_epoch(epoch)
        if self.rank == 0:  # images of all processes, for status's throughput
            label = "train" if self.folder.name == "default" else f"train {self.folder.name}"  # status's row
            manifest.record_invocation(self.run, label, started, self.clock.steps * self.cfg.images_per_step)
        return self.report()

    def batches(self, epoch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """This process's share of the epoch from the current position; times the waits for data."""
        seed = self.spec.recipe.recipe.seed if self.spec.seed is None else self.spec.seed
        order = epoch_order(self.train_ids, seed, epoch, self.cfg.order)
        share = rank_share(order, self.rank, self.world, self.cfg.images_per_step)
        self.clock.seen = share[: self.state.position]
        it = self.train_data.read(share[self.state.position:])
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            wait = time.perf_counter() - t
            if self.clock.first_wait is None:
                self.clock.first_wait = wait
            self.state.wait += wait
            self.clock.wait += wait
            if batch is None:
                return
            self.clock.seen.append(batch[0])
            yield batch

    def _tick(self, tick: float) -> float:
        now = time.perf_counter()
        self.state.seconds += now - tick
        self.clock.seconds += now - tick
        return now

    def _info(self, loss: torch.Tensor) -> str:
        c = self.clock
        return (f"epoch {self.state.epoch}  loss {float(loss):.4g}  {c.steps / max(c.seconds, 1e-9):.2f} steps/s  "
                f"data wait {100 * c.wait / max(c.seconds, 1e-9):.1f}%")

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean per-image MSE of the student (single pass) on the held-out maps, over all processes;
        None without a held-out slice (holdout_fraction = 0)."""
        if not self.spec.val_items:
            return None
        ids = [it.image_id for it in self.spec.val_items][self.rank::self.world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for image_id, img, teacher in self.val_data.read(ids):
            total[0] += self.student.mse(img, teacher, key=image_id)
            total[1] += 1
        mse_sum, n = distributed.all_reduce_sum(total.tolist(), self.device)
        return mse_sum / n

    def end_epoch(self, epoch: int) -> None:
        t0, s = time.perf_counter(), self.state
        val = self.validate()
        loss_sum, images = distributed.all_reduce_sum([float(s.loss_sum), s.loss_images], self.device)
        is_best = val is None or val < s.best_val_mse  # no held-out slice: the best is the last epoch
        s.last_val_mse, s.best_val_mse = val, s.best_val_mse if val is None else min(s.best_val_mse, val)
        seconds, wait = s.seconds + time.perf_counter() - t0, s.wait
        row = dict(epoch=epoch, step=s.step, train_loss=loss_sum / max(images, 1), val_mse=val,
                   baseline_val_mse=s.baseline_val_mse, seconds=seconds, data_wait_seconds=wait,
                   checkpoint=f"checkpoints/ckpt-{s.step:09d}")
        s.epoch, s.position = epoch + 1, 0
        s.reset_epoch(self.device)
        self.checkpointer.save(s.step, epoch_end=True, meta=dict(row=row, best=is_best))
        if self.rank == 0:
            self.publish(row, is_best)
        held = ("no held-out slice" if val is None else
                f"val_mse {val:.6g} (baseline {s.baseline_val_mse:.6g}){' best' if is_best else ''}")
        log.info("train: epoch %d step %d train_loss %.6g %s, %.1fs, data wait %.1f%%", epoch, s.step,
                 row["train_loss"], held, seconds, 100 * wait / max(seconds, 1e-9))

    def publish(self, row: dict, is_best: bool) -> None:
        """Rank 0: the best student (if this epoch is it), then the epoch's manifest row."""
        if is_best:
            self.checkpointer.export_best(self.student.model, dict(
                backbone=self.spec.recipe.recipe.backbone, epoch=row["epoch"], step=row["step"],
                val_mse=row["val_mse"], baseline_val_mse=row["baseline_val_mse"], checkpoint=row["checkpoint"]))
        manifest.write_part(self.folder, "train", [row])

    # ---- state (what the checkpointer saves) and resume ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        loss = distributed.all_reduce_sum([float(s.loss_sum), s.loss_images], self.device)  # every rank calls this
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        return dict(
            **self.student.state_dict(),  # model (trainable weights), optimizer, scaler
            rng=dict(torch=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), python=random.getstate()),
            **s.state_dict(self.world, self.cfg.images_per_step, (loss[0], int(loss[1]))),
            data=dict(trainable=self.cfg.trainable, backbone=self.spec.recipe.recipe.backbone,
                      train_ids=_digest(self.train_ids), n_train=len(self.train_ids)),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data, prog, backbone = state["data"], state["progress"], self.spec.recipe.recipe.backbone
        if (data["backbone"], data["trainable"]) != (backbone, self.cfg.trainable):
            raise TrainError(f"the checkpoint trains {data['backbone']} with trainable={data['trainable']!r}, "
                             f"this run asks for {backbone} with {self.cfg.trainable!r}; "
                             "use the same --trainable, or --no-resume to start over")
        if data["train_ids"] != _digest(self.train_ids):
            raise TrainError(f"the training images changed since the checkpoint ({data['n_train']} then, "
                             f"{len(self.train_ids)} now); finish extract before training, or --no-resume")
        per_step = prog.get("images_per_step", prog["world"])  # before images_per_step: one image per process
        if per_step != self.cfg.images_per_step:
            raise TrainError(f"the checkpoint trains with images_per_step={per_step}, this run asks for "
                             f"{self.cfg.images_per_step}; use the same, or --no-resume to start over")
        self.student.load_state_dict(state)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.state.load_state_dict(state, self.world, self.rank, self.device)

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (every rank loads the one rank 0 picked)."""
        found = self.checkpointer.load_latest() if self.rank == 0 else None
        step = distributed.broadcast(found[0].step if found else None)
        if step is None:
            return
        entry, state = found if self.rank == 0 else self.checkpointer.load(step)
        self.load_state_dict(state)
        log.info("train: resumed from step %d (epoch %d, position %d)", self.state.step, self.state.epoch,
                 self.state.position)
        if entry.epoch_end and self.rank == 0:  # the crash may have come between checkpoint and row
            row = entry.meta["row"]
            done = manifest.read_manifest(self.folder, "train").to_pylist()
            if not any(r["epoch"] == row["epoch"] and r["step"] == row["step"] for r in done):
                self.publish(row, entry.meta["best"])

    def report(self, stopped: bool = False) -> dict[str, Any]:
        """What this call did (rank 0's is returned); ``shares``: each process's images of the last epoch."""
        s, c = self.state, self.clock
        shares = distributed.gather(c.seen)  # every rank calls this
        return dict(
            step=s.step, epoch=s.epoch, steps_this_run=c.steps, stopped=stopped, world=self.world,
            images_per_step=self.cfg.images_per_step, train_images=len(self.train_ids),
            val_images=len(self.spec.val_items), trainable=self.student.n_trainable,
            baseline_val_mse=s.baseline_val_mse, val_mse=s.last_val_mse,
            best_val_mse=None if math.isinf(s.best_val_mse) else s.best_val_mse,
            best_rule="lowest val_mse" if self.spec.val_items else "last epoch (no held-out slice)",
            seconds=round(c.seconds, 3), steps_per_second=c.steps / max(c.seconds, 1e-9),
            data_wait_share=c.wait / max(c.seconds, 1e-9), data_wait_first_seconds=c.first_wait or 0.0,
            shares=dict(enumerate(shares)) if any(shares) else {},
        )
