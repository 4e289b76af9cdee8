"""The ``extract`` stage: run the sliding-window teacher over every augmented image.

A run may hold several teachers over the same images (``RUN/teachers/<name>/``, run.py): the
recipe's ``[extract]`` is teacher ``default``; ``teacher=NAME`` with ``stride`` (or other [extract]
keys) makes another, frozen in its teacher.toml with its own fingerprint, store and manifest, so a
second teacher never touches the first.

The client plans batches of pending images (sorted by size so windows batch well) and
submits them to the engine; each worker task decodes its images in background threads,
runs the teacher with windows batched across images, writes each map to the store in a
background thread, and only then appends the batch's manifest part. A worker that dies
costs its batch, which Dask reruns elsewhere; a killed client is resumed by rerunning.

Concurrency: writes are idempotent (one array per image, whole-map chunks, same bytes for
the same input on CPU), so two extracts on one run may duplicate work but never corrupt it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from spar_pipeline import manifest
from spar_pipeline.errors import RunError
from spar_pipeline.fsutil import redact
from spar_pipeline.recipe import ExtractConfig, extract_config
from spar_pipeline.run import Run

__all__ = ["ExtractSpec", "teacher_fingerprint", "extract_batch", "run", "plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSpec:
    """Everything a worker needs, picklable and free of live objects: the recipe's typed ``[extract]``
    (``window_batch`` may be the command's), not a copy of its fields."""

    run_url: str
    storage_options: dict
    backbone: str
    checkpoint: str
    extract: ExtractConfig
    max_pixels: int
    fingerprint: dict
    teacher: str = "default"  # the teacher folder its maps and manifest parts go to


def teacher_fingerprint(run: Run, weights_digest: str, patch: int, extract: ExtractConfig | None = None) -> dict:
    """What makes two teacher maps comparable; a store with another fingerprint is refused.
    ``extract``: the teacher's [extract] settings (default the recipe's, teacher default)."""
    from spar_pipeline.windows import upsample_factor

    r = run.recipe
    ex = extract or r.extract
    aug = json.dumps({"seed": r.recipe.seed, **asdict(r.augment)}, sort_keys=True, default=list)
    fp = {
        "backbone": r.recipe.backbone,
        "weights": weights_digest,
        "window": ex.window,
        "stride": ex.stride,
        "patch": patch,
        "upsample": upsample_factor(patch, ex.stride),
        "dtype": ex.store_dtype,
        "augment": hashlib.sha256(aug.encode()).hexdigest()[:16],
    }
    fp["digest"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


# ---- worker side ------------------------------------------------------------------------

_MODELS: dict[tuple, Any] = {}


def _device():
    from spar_pipeline.devices import worker_device

    return worker_device()


def _model(spec: ExtractSpec):
    """One frozen teacher per worker process, built on first use."""
    key = (spec.backbone, spec.checkpoint)
    if key not in _MODELS:
        import torch

        from spar_pipeline.backbones import BackboneError, build

        torch.set_float32_matmul_precision("medium")  # reference: fp32 matmul precision "medium"
        b = build(spec.backbone, checkpoint=spec.checkpoint or None).eval().to(_device())
        for p in b.parameters():
            p.requires_grad_(False)
        if b.weights_digest != spec.fingerprint["weights"]:
            raise BackboneError(
                f"worker {_worker_id()}: weights of {spec.backbone} differ from the client's "
                f"({b.weights_digest} != {spec.fingerprint['weights']}); give every machine the same checkpoint"
            )
        _MODELS.clear()
        _MODELS[key] = b
    return _MODELS[key]


def _warm_up() -> None:
    """Import what a teacher needs (torch, open_clip, timm: seconds on a CPU) before the first batch arrives."""
    import spar_pipeline.backbones  # noqa: F401


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _autocast_dtype(spec: ExtractSpec, device):
    from spar_pipeline.devices import autocast_dtype  # the one rule, shared with train

    return autocast_dtype(spec.extract.precision, device)


def _windows(img, spec: ExtractSpec) -> int:
    from spar_pipeline.windows import window_starts

    window, stride = spec.extract.window, spec.extract.stride
    return len(window_starts(img.shape[-2], window, stride)) * len(window_starts(img.shape[-1], window, stride))


def _reject(item: dict, reason: str, fp: dict, worker: str) -> dict:
    return dict(image_id=item["image_id"], status="rejected", reason=reason, grid_h=0, grid_w=0, dim=0,
                checksum="", windows=0, seconds=0.0, worker=worker, fingerprint=fp["digest"])


def extract_batch(spec: ExtractSpec, items: list[dict]) -> dict:
    """Teacher maps for one batch of images; writes maps, then one manifest part.

    ``items`` hold the merged ingest + augment rows of each image. Returns a small report
    for the client's progress display.
    """
    from spar_pipeline.augmentation import augmented_from_rows
    from spar_pipeline.store import FeatureStore, map_checksum
    from spar_pipeline.windows import sliding_features_many

    t0 = time.perf_counter()
    worker = _worker_id()
    backbone = _model(spec)
    device = _device()
    teacher = Run(spec.run_url, spec.storage_options).teacher(spec.teacher)
    store = FeatureStore.open(teacher.store_url, storage_options=spec.storage_options, fingerprint=spec.fingerprint)
    fp = spec.fingerprint
    rows: list[dict] = []
    n_windows = 0
    forward_seconds = 0.0

    def load(item: dict):
        try:
            return augmented_from_rows(item["ingest"], item["augment"], spec.max_pixels, spec.storage_options)
        except ValueError as e:  # ImageRejected and size mismatches: bad input, not a crash
            return e

    # Decode ahead in threads while the model works; write maps behind it.
    with ThreadPoolExecutor(2, thread_name_prefix="decode") as decoder, \
            ThreadPoolExecutor(2, thread_name_prefix="write") as writer:
        decoded = [decoder.submit(load, it) for it in items]
        writes = []
        group: list[tuple[dict, Any]] = []
        group_windows = 0

        def flush() -> None:
            nonlocal group, group_windows, n_windows, forward_seconds
            if not group:
                return
            images = [backbone.normalize(img.to(device, non_blocking=True).float().div_(255.0)) for _, img in group]
            tf = time.perf_counter()
            maps = sliding_features_many(backbone, images, spec.extract.window, spec.extract.stride,
                                         batch=spec.extract.window_batch,
                                         autocast_dtype=_autocast_dtype(spec, device))
            elapsed = time.perf_counter() - tf
            forward_seconds += elapsed
            for (item, img), fmap in zip(group, maps):
                wins = _windows(img, spec)
                n_windows += wins
                arr = fmap.float().cpu().numpy()
                if not np.isfinite(arr).all():
                    log.warning("image %s: teacher map holds NaN/Inf; rejected", item["image_id"])
                    rows.append(_reject(item, "teacher map holds NaN or Inf", fp, worker))
                    continue
                with np.errstate(over="ignore"):  # an overflow is caught just below, as a rejected row
                    half = arr if store.dtype == "float32" else arr.astype(np.float16)  # float32: as computed
                if not np.isfinite(half).all():
                    log.warning("image %s: teacher map overflows float16; rejected", item["image_id"])
                    rows.append(_reject(item, "teacher map overflows float16", fp, worker))
                    continue
                secs = elapsed * wins / max(group_windows, 1)
                writes.append((item, half, secs, wins, writer.submit(
                    store.write, item["image_id"], half, {"fingerprint": fp["digest"]})))
            group, group_windows = [], 0

        for item, fut in zip(items, decoded):
            img = fut.result()
            if isinstance(img, Exception):
                log.warning("image %s: %s; rejected", item["image_id"], img)
                rows.append(_reject(item, f"decode: {img}", fp, worker))
                continue
            group.append((item, img))
            group_windows += _windows(img, spec)
            if group_windows >= spec.extract.window_batch:
                flush()
        flush()
        for item, half, secs, wins, fut in writes:
            checksum = fut.result()  # a failed write raises here: no row for work not written
            h, w, d = half.shape
            rows.append(dict(image_id=item["image_id"], status="ok", reason="", grid_h=h, grid_w=w, dim=d,
                             checksum=checksum or map_checksum(half), windows=wins, seconds=secs, worker=worker,
                             fingerprint=fp["digest"]))
    manifest.write_part(teacher, "extract", rows)
    return dict(worker=worker, done=sum(r["status"] == "ok" for r in rows),
                rejected=sum(r["status"] == "rejected" for r in rows), windows=n_windows,
                seconds=time.perf_counter() - t0, forward_seconds=forward_seconds)


# ---- client side ------------------------------------------------------------------------

def plan(run: Run, limit: int | None = None, teacher: str = "default") -> list[dict]:
    """Images pending for ``teacher`` with their ingest and augment rows, largest first."""
    ingest = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
    done = manifest.read_manifest(run.teacher(teacher), "extract")
    todo = manifest.pending(manifest.read_manifest(run, "augment"), done)
    items = [dict(image_id=a["image_id"], ingest=ingest[a["image_id"]], augment=a)
             for a in todo.to_pylist() if a["image_id"] in ingest]
    items.sort(key=lambda it: (-(it["augment"]["height"] * it["augment"]["width"]), it["image_id"]))
    return items[:limit] if limit else items


def _batches(items: list[dict], size: int) -> list[list[dict]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run(run_dir: Run, *, gpus: list[int] | None = None, workers: int | None = None, scheduler: str | None = None,
        window_batch: int | None = None, limit: int | None = None, progress: bool = True, teacher: str = "default",
        stride: int | None = None, settings: dict | None = None) -> dict:
    """CLI ``extract``: teacher ``teacher``'s maps of every augmented image not done yet. Its first call
    freezes its [extract] settings (the recipe's, with ``stride`` and ``settings``, e.g. a [[teachers]]
    table's keys) in its teacher.toml; later calls resume it, and one that asks other settings is
    refused naming the keys. ``window_batch`` is this call's alone (it does not change the maps)."""
    from spar_pipeline.backbones import build
    from spar_pipeline.engine import open_engine
    from spar_pipeline.progress import StageProgress
    from spar_pipeline.store import FeatureStore

    recipe = run_dir.recipe
    if not manifest.read_manifest(run_dir, "augment").num_rows:  # before the teacher is built or the store made
        raise RunError(f"{run_dir}: nothing augmented yet; run `spar-pipeline augment --run {run_dir.url}` first")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    folder = run_dir.teacher(teacher)
    given = {**(settings or {}), **({} if stride is None else {"stride": stride})}
    frozen = folder.plan(asdict(recipe.extract), given)  # refused here, before anything is built or written
    cfg = extract_config(recipe.extract, frozen, f"[teachers.{teacher}]", redact(run_dir.url))
    items = plan(run_dir, limit, teacher)
    # The workers start first and import the model's code while the client builds its probe (each ~5 s on a CPU).
    with open_engine(gpus, workers, scheduler) if items else contextlib.nullcontext() as engine:
        warming = [] if engine is None else [engine.client.submit(_warm_up, workers=[w], pure=False)
                                             for w in engine.client.scheduler_info()["workers"]]  # held: not released
        # Built on CPU only to fingerprint the weights: the client never initialises CUDA.
        probe = build(recipe.recipe.backbone, checkpoint=recipe.recipe.checkpoint or None)
        fp = teacher_fingerprint(run_dir, probe.weights_digest, probe.patch_size, cfg)
        del probe
        folder.check(fp)  # another fingerprint is refused before the store is touched
        FeatureStore.create(folder.store_url, fp, storage_options=run_dir.storage_options,
                            codec=cfg.codec, level=cfg.codec_level, dtype=cfg.store_dtype)
        folder.freeze(frozen, fp)  # after the store accepted the fingerprint
        if not items:
            log.info("extract: nothing pending")
            return dict(done=0, rejected=0, windows=0, forward_seconds=0.0, task_seconds=0.0, seconds=0.0)
        spec = ExtractSpec(run_dir.url, run_dir.storage_options, recipe.recipe.backbone, recipe.recipe.checkpoint,
                           replace(cfg, window_batch=window_batch or cfg.window_batch), recipe.ingest.max_pixels, fp,
                           teacher)
        batches = _batches(items, cfg.images_per_task)
        totals = dict(done=0, rejected=0, windows=0, forward_seconds=0.0, task_seconds=0.0)
        per_worker: dict[str, int] = {}
        log.info("extract: teacher %s (stride %d): %d images in %d batches on %s", teacher, cfg.stride, len(items),
                 len(batches), engine.description)
        futures = [
            engine.submit(extract_batch, spec, b, retries=cfg.retries, pure=False,
                          key=f"extract-{b[0]['image_id']}-{uuid.uuid4().hex[:8]}")
            for b in batches
        ]
        with StageProgress("extract", total=len(items), enabled=progress) as bar:
            for rep in engine.results(futures):
                for k in ("done", "rejected", "windows", "forward_seconds"):
                    totals[k] += rep[k]
                totals["task_seconds"] += rep["seconds"]
                per_worker[rep["worker"]] = per_worker.get(rep["worker"], 0) + rep["done"] + rep["rejected"]
                bar.update(rep["done"] + rep["rejected"], windows=rep["windows"], workers=per_worker)
        del warming
    seconds = time.perf_counter() - t0
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest.write_part(run_dir, "summary", [dict(
        stage="extract" if teacher == "default" else f"extract {teacher}", started=started, finished=finished,
        done=totals["done"], rejected=totals["rejected"],
        seconds=seconds, items_per_second=(totals["done"] + totals["rejected"]) / seconds,
        windows_per_second=totals["windows"] / seconds, workers=json.dumps(per_worker))])
    manifest.compact(folder, "extract")
    report = dict(totals, seconds=round(seconds, 2), images_per_second=round(totals["done"] / seconds, 3),
                  windows_per_second=round(totals["windows"] / seconds, 1), workers=len(per_worker))
    log.info("extract: %s", report)
    return report
