"""The ``train`` stage: a single-pass student distilled from the stored teacher maps (SPAR §4).

Every image that is ok in both the augment and the extract manifests is used, except a
held-out slice (``holdout_fraction``, drawn from (seed, image id)) that is never trained on and
gives ``val_mse`` each epoch, and ``baseline_val_mse`` once, before the first step. The student
is the recipe's backbone with ``set_trainable(spec)``; it sees the whole augmented image in one
pass and regresses the teacher map with MSE over all elements. AdamW over the trainable
parameters, constant LR, one image per micro-step and ``[train].images_per_step`` images per
optimizer step (gradients accumulate, so 1, 2 or 4 devices take the same steps); fp16 (grad
scaler) or bf16 autocast on GPU, float32 on CPU. ``gpus=[0, 1]`` (or ``processes=2`` on CPU,
gloo) runs DDP, one process per device; micro-step ``m`` of an epoch on rank ``r`` trains image
``order[m·world + r]``, so the images consumed after ``k`` optimizer steps are always the first
``k·images_per_step`` of the epoch order.

Resume goes through ``Trainer.state_dict`` and the :class:`~spar_pipeline.checkpoint.Checkpointer`
(interval, retention, atomic writes). At each epoch end rank 0 saves the epoch checkpoint, then
exports the best student (``checkpoints/best.safetensors`` for ``build(name, checkpoint=...)``
and ``checkpoints/best_open_clip.safetensors`` in open_clip's key layout), then writes the
epoch's manifest row, which is the completion record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch

from spar_pipeline import manifest
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.errors import TrainError
from spar_pipeline.run import Run
from spar_pipeline.student import Student

__all__ = ["run", "summary_line", "TrainError", "TrainSpec", "plan", "split_holdout", "epoch_order", "rank_share", "Trainer"]

log = logging.getLogger(__name__)

BEST = "best.safetensors"
BEST_OPEN_CLIP = "best_open_clip.safetensors"
LOG_EVERY = 10  # steps between progress updates (each one syncs the device once)


# ---- the data plan: which images, which split, which order --------------------------------------
def _unit(seed: int, image_id: int, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_holdout(ids: list[int], seed: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out): an image is held out when its hash of (seed, id) falls below
    ``fraction``, so membership does not depend on the other images; at least one of each, except
    that ``fraction`` 0 holds nothing out (the reference's training set)."""
    ids = sorted(ids)
    if fraction == 0:
        return ids, []
    if len(ids) < 2:
        raise TrainError(f"{len(ids)} image(s) ready: training needs at least 2 (one is held out for validation)")
    u = {i: _unit(seed, i, "holdout") for i in ids}
    val = {i for i in ids if u[i] < fraction} or {min(ids, key=u.__getitem__)}
    if len(val) == len(ids):
        val.discard(max(ids, key=u.__getitem__))
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def epoch_order(ids: list[int], seed: int, epoch: int, order: str = "shuffle") -> list[int]:
    """The epoch's order, a pure function of (seed, epoch, the id set): a fresh permutation each
    epoch ("shuffle"), or the ids sorted, the same every epoch ("sorted", the reference's)."""
    ids = sorted(ids)
    if order == "sorted":
        return ids
    if order != "shuffle":
        raise TrainError(f"[train].order={order!r}: must be shuffle or sorted")
    rng = np.random.default_rng([seed, epoch, 0x7472])
    return [ids[i] for i in rng.permutation(len(ids))]


def rank_share(order: list[int], rank: int, world: int, images_per_step: int | None = None) -> list[int]:
    """Rank ``rank``'s images: ``order[m·world + rank]`` for each of its micro-steps ``m``, so
    optimizer step ``k`` trains ``order[k·E:(k+1)·E]`` (E = ``images_per_step``, default ``world``)
    whatever ``world`` divides E; the tail that does not fill an optimizer step is left out this
    epoch (the next epoch shuffles anew)."""
    per_step = images_per_step or world
    return [order[m * world + rank] for m in range(len(order) // per_step * per_step // world)]


@dataclass(frozen=True)
class Item:
    image_id: int
    ingest_row: dict
    augment_row: dict
    grid: tuple[int, int, int]  # teacher map shape (h, w, D) from the extract manifest


def plan(run: Run) -> tuple[list[Item], list[Item]]:
    """(train items, held-out items): images ok in both augment and extract."""
    recipe = run.recipe
    ingest = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
    augment = {r["image_id"]: r for r in manifest.read_manifest(run, "augment").to_pylist() if r["status"] == "ok"}
    extract = {r["image_id"]: r for r in manifest.read_manifest(run, "extract").to_pylist() if r["status"] == "ok"}
    ids = sorted(set(augment) & set(extract) & set(ingest))
    need = 1 if recipe.train.holdout_fraction == 0 else 2
    if len(ids) < need:
        raise TrainError(f"{run!r}: {len(ids)} image(s) are done in both augment and extract; "
                         f"run `spar-pipeline extract` first (training needs at least {need})")
    train_ids, val_ids = split_holdout(ids, recipe.recipe.seed, recipe.train.holdout_fraction)

    def item(i: int) -> Item:
        e = extract[i]
        return Item(i, ingest[i], augment[i], (e["grid_h"], e["grid_w"], e["dim"]))

    return [item(i) for i in train_ids], [item(i) for i in val_ids]


class PairDataset(torch.utils.data.Dataset):
    """(image id, augmented uint8 image [3,H,W], teacher map float16 [h,w,D]); opens the store
    lazily in each worker process and never re-reads a manifest."""

    def __init__(self, items: list[Item], store_url: str, storage_options: dict, max_pixels: int):
        self.items, self.store_url, self.max_pixels = items, store_url, max_pixels
        self.storage_options = storage_options
        self._store, self._pid = None, None

    def __len__(self) -> int:
        return len(self.items)

    def _open(self):
        if self._store is None or self._pid != os.getpid():
            from spar_pipeline.store import FeatureStore

            self._store, self._pid = FeatureStore.open(self.store_url, self.storage_options), os.getpid()
        return self._store

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        from spar_pipeline.augmentation import augmented_from_rows

        it = self.items[i]
        img = augmented_from_rows(it.ingest_row, it.augment_row, self.max_pixels, self.storage_options)
        teacher = self._open().read(it.image_id)
        if teacher.shape != it.grid:
            raise TrainError(f"image {it.image_id}: teacher map {teacher.shape} != {it.grid} in the extract manifest; "
                             "run `spar-pipeline verify --repair`")
        return it.image_id, img, torch.from_numpy(teacher)


class _Indices(torch.utils.data.Sampler):
    """A sampler whose index list is set before each pass (epoch order, resumed position)."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class TrainSpec:
    """Everything a rank needs; plain data so it crosses a spawn."""

    url: str
    storage_options: dict
    backbone: str
    checkpoint: str
    trainable: str
    epochs: int
    images_per_step: int
    order: str
    lr: float
    weight_decay: float
    precision: str
    checkpoint_every: int
    loader_workers: int
    seed: int
    max_pixels: int
    train_items: list
    val_items: list
    gpus: tuple[int, ...] | None
    world: int
    progress: bool
    stop_after_steps: int | None = None
    keep_latest_k: int = 2
    log_level: int = logging.INFO


def _digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()[:16]


# ---- the trainer ----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, spec: TrainSpec, rank: int = 0, world: int = 1):
        from spar_pipeline.backbones import build

        self.spec, self.rank, self.world = spec, rank, world
        self.device = torch.device(f"cuda:{spec.gpus[rank]}") if spec.gpus else torch.device("cpu")
        self.run = Run(spec.url, spec.storage_options)
        self.student = Student(build(spec.backbone, spec.checkpoint or None), spec.trainable, lr=spec.lr,
                               weight_decay=spec.weight_decay, precision=spec.precision, device=self.device,
                               accumulate=spec.images_per_step // world, ddp=world > 1)
        self.model, self.n_trainable = self.student.model, self.student.n_trainable
        self.checkpointer = Checkpointer(self.run, self.state_dict, every=spec.checkpoint_every,
                                         keep_latest_k=spec.keep_latest_k, enabled=rank == 0)
        self.train_ids = sorted(it.image_id for it in spec.train_items)
        self.train_loader, self.train_sampler, self.train_index = self._loader(spec.train_items)
        self.val_loader, self.val_sampler, _ = self._loader(spec.val_items)
        # progress (the part of the state that is not tensors)
        self.epoch = self.position = self.step = 0
        self.baseline_val_mse: float | None = None
        self.best_val_mse = math.inf
        self.last_val_mse: float | None = None
        self._reset_epoch()
        self.run_steps, self.run_seconds, self.run_wait = 0, 0.0, 0.0
        self.run_first_wait: float | None = None
        self.shares: dict[int, list[int]] = {}

    def _loader(self, items: list[Item]):
        dataset = PairDataset(items, self.run.store_url, self.spec.storage_options, self.spec.max_pixels)
        sampler = _Indices()
        workers = self.spec.loader_workers
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,  # workers live for one pass, so none outlives train()
        )
        return loader, sampler, {it.image_id: i for i, it in enumerate(items)}

    def _reset_epoch(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_steps = 0
        self.epoch_seconds = self.epoch_wait = 0.0

    # ---- state (what the checkpointer saves) ------------------------------------------------
    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def state_dict(self) -> dict[str, Any]:
        loss_sum, loss_steps = self._all_reduce([float(self.loss_sum), float(self.loss_steps)])  # every rank calls this
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        return dict(
            **self.student.state_dict(),  # model (trainable weights), optimizer, scaler
            rng=dict(torch=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), python=random.getstate()),
            progress=dict(epoch=self.epoch, position=self.position, step=self.step, world=self.world,
                          images_per_step=self.spec.images_per_step),
            epoch_acc=dict(loss_sum=loss_sum, loss_steps=int(loss_steps), seconds=self.epoch_seconds,
                           wait=self.epoch_wait),
            metrics=dict(baseline_val_mse=self.baseline_val_mse, best_val_mse=self.best_val_mse,
                         last_val_mse=self.last_val_mse),
            data=dict(trainable=self.spec.trainable, backbone=self.spec.backbone, train_ids=_digest(self.train_ids),
                      n_train=len(self.train_ids)),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        if (data["backbone"], data["trainable"]) != (self.spec.backbone, self.spec.trainable):
            raise TrainError(f"the checkpoint trains {data['backbone']} with trainable={data['trainable']!r}, "
                             f"this run asks for {self.spec.backbone} with {self.spec.trainable!r}; "
                             "use the same --trainable, or --no-resume to start over")
        if data["train_ids"] != _digest(self.train_ids):
            raise TrainError(f"the training images changed since the checkpoint ({data['n_train']} then, "
                             f"{len(self.train_ids)} now); finish extract before training, or --no-resume")
        prog = state["progress"]
        per_step = prog.get("images_per_step", prog["world"])  # before images_per_step: one image per process
        if per_step != self.spec.images_per_step:
            raise TrainError(f"the checkpoint trains with images_per_step={per_step}, this run asks for "
                             f"{self.spec.images_per_step}; use the same, or --no-resume to start over")
        self.student.load_state_dict(state)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.epoch, self.step = prog["epoch"], prog["step"]
        # The epoch prefix consumed so far is position·world images (whole optimizer steps, so any world
        # that divides images_per_step re-cuts it exactly); re-cut it for this world size.
        self.position = prog["position"] * prog["world"] // self.world
        if prog["position"] * prog["world"] % self.world:
            log.warning("resuming with %d processes instead of %d: %d image(s) of epoch %d are trained again",
                        self.world, prog["world"], prog["position"] * prog["world"] % self.world, self.epoch)
        acc = state["epoch_acc"]
        self._reset_epoch()
        if self.rank == 0:  # the saved sums are global; only rank 0 carries them on
            self.loss_sum += acc["loss_sum"]
            self.loss_steps = acc["loss_steps"]
        self.epoch_seconds, self.epoch_wait = acc["seconds"], acc["wait"]
        m = state["metrics"]
        self.baseline_val_mse, self.best_val_mse, self.last_val_mse = (m["baseline_val_mse"], m["best_val_mse"],
                                                                       m["last_val_mse"])

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        started = time.time()
        self.resume()
        if self.baseline_val_mse is None and self.spec.val_items:
            self.baseline_val_mse = self.validate()
            log.info("train: baseline val_mse %.6g (pretrained, single pass) on %d held-out images",
                     self.baseline_val_mse, len(self.spec.val_items))
        with _Progress(self, enabled=self.spec.progress and self.rank == 0) as bar:
            for epoch in range(self.epoch, self.spec.epochs):
                self.epoch = epoch
                clock = time.perf_counter()
                with contextlib.closing(self.batches(epoch)) as batches:  # closing stops the loader workers
                    for _image_id, img, teacher in batches:
                        loss, stepped = self.student.train_step(img, teacher)
                        self.loss_sum += loss
                        self.loss_steps += 1
                        self.position += 1
                        if not stepped:  # gradients accumulate until images_per_step images are in
                            continue
                        self.step += 1
                        self.run_steps += 1
                        self.checkpointer.save(self.step)
                        clock = self._tick(clock)
                        bar.update(loss)
                        if self.spec.stop_after_steps and self.run_steps >= self.spec.stop_after_steps:
                            return self.report(stopped=True)  # as a crash would: no further checkpoint
                self.end_epoch(epoch)
                bar.epoch_done()
        if self.rank == 0:  # images of all ranks, for status's throughput
            manifest.record_invocation(self.run, "train", started, self.run_steps * self.spec.images_per_step)
        return self.report()

    def batches(self, epoch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """This rank's share of the epoch from the current position; times the waits for data."""
        order = epoch_order(self.train_ids, self.spec.seed, epoch, self.spec.order)
        share = rank_share(order, self.rank, self.world, self.spec.images_per_step)
        self.seen = share[: self.position]
        self.train_sampler.indices = [self.train_index[i] for i in share[self.position:]]
        it = iter(self.train_loader)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            wait = time.perf_counter() - t
            if self.run_first_wait is None:
                self.run_first_wait = wait  # includes starting the loader workers
            self.epoch_wait += wait
            self.run_wait += wait
            if batch is None:
                return
            self.seen.append(batch[0])
            yield batch

    def _tick(self, clock: float) -> float:
        now = time.perf_counter()
        self.epoch_seconds += now - clock
        self.run_seconds += now - clock
        return now

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean per-image MSE of the student (single pass) on the held-out maps, over all ranks;
        None without a held-out slice (holdout_fraction = 0)."""
        if not self.spec.val_items:
            return None
        self.val_sampler.indices = list(range(self.rank, len(self.spec.val_items), self.world))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _image_id, img, teacher in self.val_loader:
            total[0] += self.student.mse(img, teacher)
            total[1] += 1
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1])

    def end_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        val = self.validate()
        self._check_shares(epoch)
        loss_sum, loss_steps = self._all_reduce([float(self.loss_sum), float(self.loss_steps)])
        self.last_val_mse = val
        is_best = val is None or val < self.best_val_mse  # no held-out slice: the best is the last epoch
        self.best_val_mse = self.best_val_mse if val is None else min(self.best_val_mse, val)
        seconds, wait = self.epoch_seconds + time.perf_counter() - t0, self.epoch_wait
        row = dict(epoch=epoch, step=self.step, train_loss=loss_sum / max(loss_steps, 1), val_mse=val,
                   baseline_val_mse=self.baseline_val_mse, seconds=seconds, data_wait_seconds=wait,
                   checkpoint=f"checkpoints/ckpt-{self.step:09d}")
        self.epoch, self.position = epoch + 1, 0
        self._reset_epoch()
        self.checkpointer.save(self.step, epoch_end=True, meta=dict(row=row, best=is_best))
        if self.rank == 0:
            self.publish(row, is_best)
        held = ("no held-out slice" if val is None else
                f"val_mse {val:.6g} (baseline {self.baseline_val_mse:.6g}){' best' if is_best else ''}")
        log.info("train: epoch %d step %d train_loss %.6g %s, %.1fs, data wait %.1f%%", epoch, self.step,
                 row["train_loss"], held, seconds, 100 * wait / max(seconds, 1e-9))

    def _check_shares(self, epoch: int) -> None:
        """Every rank trained its own images: the shares are disjoint and none is held out."""
        shares = [self.seen]
        if self.world > 1:
            shares = [None] * self.world
            torch.distributed.all_gather_object(shares, self.seen)
        flat = [i for s in shares for i in s]
        held = {it.image_id for it in self.spec.val_items}
        if len(set(flat)) != len(flat) or held & set(flat):
            raise TrainError(f"epoch {epoch}: rank shares overlap or touch the held-out images (a bug)")
        self.shares = dict(enumerate(shares))

    # ---- rank 0: export and record -------------------------------------------------------------
    def publish(self, row: dict, is_best: bool) -> None:
        """Export the best student (if this epoch is it), then write the epoch's manifest row."""
        if is_best:
            from safetensors.torch import save

            def blob(sd: dict) -> bytes:
                return save({k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()})

            self.run.write_bytes_atomic(blob(self.model.state_dict()), "checkpoints", BEST)
            if self.model.family in ("siglip", "maskclip"):  # the wrapped open_clip model, in its own layout
                self.run.write_bytes_atomic(blob(self.model.model.state_dict()), "checkpoints", BEST_OPEN_CLIP)
            info = dict(backbone=self.spec.backbone, epoch=row["epoch"], step=row["step"], val_mse=row["val_mse"],
                        baseline_val_mse=row["baseline_val_mse"], checkpoint=row["checkpoint"])
            self.run.write_bytes_atomic(json.dumps(info, indent=2).encode(), "checkpoints", "best.json")
        manifest.write_part(self.run, "train", [row])

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (every rank loads the one rank 0 picked)."""
        found = self.checkpointer.load_latest() if self.rank == 0 else None
        step = [found[0].step if found else None]
        if self.world > 1:
            torch.distributed.broadcast_object_list(step, src=0)
        if step[0] is None:
            return
        entry, state = found if self.rank == 0 else self.checkpointer.load(step[0])
        self.load_state_dict(state)
        log.info("train: resumed from step %d (epoch %d, position %d)", self.step, self.epoch, self.position)
        if entry.epoch_end and self.rank == 0:  # the crash may have come between checkpoint and row
            row = entry.meta["row"]
            done = manifest.read_manifest(self.run, "train").to_pylist()
            if not any(r["epoch"] == row["epoch"] and r["step"] == row["step"] for r in done):
                self.publish(row, entry.meta["best"])

    def report(self, stopped: bool = False) -> dict[str, Any]:
        return dict(
            step=self.step, epoch=self.epoch, steps_this_run=self.run_steps, stopped=stopped, world=self.world,
            images_per_step=self.spec.images_per_step,
            train_images=len(self.train_ids), val_images=len(self.spec.val_items), trainable=self.n_trainable,
            baseline_val_mse=self.baseline_val_mse, val_mse=self.last_val_mse,
            best_val_mse=None if math.isinf(self.best_val_mse) else self.best_val_mse,
            best_rule="lowest val_mse" if self.spec.val_items else "last epoch (no held-out slice)",
            seconds=round(self.run_seconds, 3), steps_per_second=self.run_steps / max(self.run_seconds, 1e-9),
            data_wait_share=self.run_wait / max(self.run_seconds, 1e-9),
            data_wait_first_seconds=self.run_first_wait or 0.0,
            shares=self.shares,
        )


class _Progress:
    """Rank 0's live line: step, loss, steps per second, share of time waiting for data."""

    def __init__(self, trainer: Trainer, enabled: bool):
        self.t, self.enabled = trainer, enabled
        self.total = trainer.spec.epochs * (len(trainer.train_ids) // trainer.spec.images_per_step)
        self._loss = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, completed=self.t.step, info="")
        return self

    def update(self, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        self._loss = loss
        self._bar.update(self._task, completed=self.t.step)
        if self.t.run_steps % LOG_EVERY == 0:
            self._refresh()

    def _refresh(self) -> None:
        t = self.t
        rate = t.run_steps / max(t.run_seconds, 1e-9)
        info = (f"epoch {t.epoch}  loss {float(self._loss):.4g}  {rate:.2f} steps/s  "
                f"data wait {100 * t.run_wait / max(t.run_seconds, 1e-9):.1f}%")
        self._bar.update(self._task, info=info)

    def epoch_done(self) -> None:
        if self.enabled and self._loss is not None:
            self._refresh()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()


def summary_line(report: dict, best_url: str) -> str:
    """The one line ``spar-pipeline train`` prints: steps, images, held-out MSE, where the best student is."""
    best = report.get("best_val_mse")
    held = (f"held-out MSE best {'None' if best is None else f'{best:.4g}'} vs pretrained "
            f"{report['baseline_val_mse']:.4g}" if report["val_images"] else
            "no held-out slice (holdout_fraction = 0): best = last epoch")
    return (f"train: step {report['step']} ({report['steps_this_run']} this run) on {report['train_images']} images, "
            f"{report['world']} process(es), {report['images_per_step']} image(s) per step; {held}; "
            f"data wait {report['data_wait_share']:.1%}; best student: {best_url}")


# ---- processes -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, spec: TrainSpec, port: int, results) -> None:
    """One DDP process (spawned): set up the process group, train, rank 0 hands back the report."""
    logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s: %(message)s")
    if spec.gpus:
        torch.cuda.set_device(spec.gpus[rank])
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    torch.distributed.init_process_group("nccl" if spec.gpus else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=spec.world, timeout=timedelta(minutes=30))
    try:
        report = Trainer(spec, rank, spec.world).train()
        if rank == 0:
            results.put(report)
    finally:
        torch.distributed.destroy_process_group()


def run(run: Run, *, gpus: list[int] | None = None, epochs: int | None = None, trainable: str | None = None,
        resume: bool = True, processes: int | None = None, progress: bool = True,
        stop_after_steps: int | None = None, images_per_step: int | None = None) -> dict:
    """CLI ``train``. ``gpus``: one DDP process per listed GPU (NCCL); otherwise ``processes`` CPU
    processes (gloo, default 1); their count must divide ``[train].images_per_step`` (the default
    GPU list is cut to the largest count that does). ``resume`` continues from the newest intact
    checkpoint; off, the run's checkpoints and train manifest are cleared first. ``stop_after_steps``
    stops after that many optimizer steps of this call as a crash would (no final checkpoint): for
    tests and benchmarks. ``epochs``, ``trainable``, ``images_per_step`` override the recipe."""
    recipe = run.recipe
    cfg = recipe.train
    per_step = images_per_step or cfg.images_per_step
    if cfg.batch_size != 1:
        raise TrainError(f"[train].batch_size={cfg.batch_size}: the method trains with batch size 1 per device "
                         "(images differ in size); set it to 1 and use images_per_step for a larger effective batch")
    if per_step < 1:
        raise TrainError(f"images_per_step={per_step}: must be ≥ 1")
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
        world = processes or 1
    if world < 1:
        raise TrainError(f"processes={processes}: must be ≥ 1")
    if per_step % world:
        divisors = [d for d in range(1, per_step + 1) if per_step % d == 0]
        raise TrainError(f"{world} {'GPUs' if gpus else 'processes'} do not divide [train].images_per_step="
                         f"{per_step}: use {' or '.join(map(str, divisors))} (each process accumulates "
                         "images_per_step / processes images per optimizer step)")
    train_items, val_items = plan(run)
    if len(train_items) < per_step:
        raise TrainError(f"{len(train_items)} training image(s) for images_per_step={per_step}: "
                         "not one optimizer step; add images or lower images_per_step")
    spec = TrainSpec(
        url=run.url, storage_options=run.storage_options, backbone=recipe.recipe.backbone,
        checkpoint=recipe.recipe.checkpoint, trainable=trainable or cfg.trainable, epochs=epochs or cfg.epochs,
        images_per_step=per_step, order=cfg.order, lr=cfg.lr, weight_decay=cfg.weight_decay, precision=cfg.precision, checkpoint_every=cfg.checkpoint_every,
        loader_workers=cfg.loader_workers, seed=recipe.recipe.seed, max_pixels=recipe.ingest.max_pixels,
        train_items=train_items, val_items=val_items, gpus=tuple(gpus) if gpus else None, world=world,
        progress=progress, stop_after_steps=stop_after_steps, log_level=logging.getLogger().getEffectiveLevel(),
    )
    if world > 1:  # a bad spec fails here, once, rather than in every spawned process
        from spar_pipeline.backbones import build

        build(spec.backbone, spec.checkpoint or None).set_trainable(spec.trainable)
    if not resume:
        n = Checkpointer(run, dict, every=1).clear()
        for name in (BEST, BEST_OPEN_CLIP, "best.json"):
            if run.exists("checkpoints", name):
                run.fs.rm(run.path("checkpoints", name))
        if run.exists("manifests", "train"):
            run.fs.rm(run.path("manifests", "train"), recursive=True)
        log.info("train: resume off: %d checkpoint(s) and the train manifest cleared", n)
    log.info("train: %d training and %d held-out images, %d process(es) on %s, %d image(s) per optimizer step",
             len(train_items), len(val_items), world, f"GPUs {spec.gpus}" if gpus else "CPU", per_step)
    if world == 1:
        if gpus:
            torch.cuda.set_device(gpus[0])
        return Trainer(spec).train()
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_main, args=(spec, _free_port(), results), nprocs=world, start_method="spawn")
    return results.get()
