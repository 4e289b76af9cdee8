"""SIGKILL at seeded random moments in every stage; after each kill the rerun finishes the rest.

21 kills: ingest 7, augment 5, extract 2 (the client with its workers) + 2 (one worker, during
the rerun), train 5. The moments are a seeded list of delays, measured from a point where the stage is
known to be working (the CLI ready, a first part or checkpoint written), so they land inside
the work. After each kill: what is recorded is intact and counted once; after the rerun: every
planned image is done exactly once, every map verifies, training resumed from its last
checkpoint and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import random
import shutil
import time

import signal

import numpy as np
import psutil
import pytest

from spar_pipeline import augment, ingest, manifest, train
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore

from faults._support import (EPOCHS, EVERY, IMAGES, assert_maps_intact, assert_no_conflicts, checkpoint_steps,
                             copy_run, done_once, kill_group, parts, ready, start, wait_until)

_rng = random.Random(20260508)
MOMENTS = {  # seconds after the stage is seen working
    "ingest": [round(_rng.uniform(0.1, 2.5), 2) for _ in range(7)],
    "augment": [round(_rng.uniform(0.05, 1.4), 2) for _ in range(5)],
    "extract-client": [round(_rng.uniform(0.0, 1.0), 2) for _ in range(2)],
    "extract-worker": [round(_rng.uniform(0.0, 0.3), 2) for _ in range(2)],
    "train": [round(_rng.uniform(0.0, 0.6), 2) for _ in range(5)],
}


def test_at_least_twenty_seeded_moments():
    assert sum(map(len, MOMENTS.values())) >= 20
    assert MOMENTS["ingest"] == [round(random.Random(20260508).uniform(0.1, 2.5), 2)] + MOMENTS["ingest"][1:]  # seeded


def _fresh(augmented, dst) -> Run:
    run = copy_run(augmented, dst)
    shutil.rmtree(run.path("manifests", "augment"))
    shutil.rmtree(run.path("manifests", "ingest"))
    shutil.rmtree(run.path("manifests", "tars"))
    return run


def test_ingest_killed_seven_times(tmp_path, source, recipe, augmented):
    clean = Run(str(augmented))
    want = {r["image_id"]: r for r in manifest.read_manifest(clean, "ingest").to_pylist()}
    want_tars = sorted(manifest.read_manifest(clean, "tars").to_pylist(), key=lambda t: t["source"])
    for i, delay in enumerate(MOMENTS["ingest"]):
        run = _fresh(augmented, tmp_path / "run")  # run.toml only: every kill meets the whole stage
        log = tmp_path / f"ingest-{i}.log"
        proc = start(["ingest", str(source), "--run", run.url], slow=0.5, log=log)
        wait_until(ready(log), proc)
        time.sleep(delay)
        assert kill_group(proc), f"ingest finished before the kill at {delay}s: {log.read_text()[-500:]}"
        # after the kill: rows recorded are the clean ones, and a tar's marker implies all its rows
        rows = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
        assert all(r == want[k] for k, r in rows.items())
        assert_no_conflicts(run, "ingest", ("source", "offset", "checksum", "status"))
        for t in manifest.read_manifest(run, "tars").to_pylist():
            assert sum(r["source"] == t["source"] for r in rows.values()) == t["images"]
        ingest.run(run, [str(source)])  # the rerun, in this process
        assert done_once(run, "ingest", list(want)) == want
        assert sorted(manifest.read_manifest(run, "tars").to_pylist(), key=lambda t: t["source"]) == want_tars


def test_augment_killed_five_times(tmp_path, recipe, augmented):
    clean = Run(str(augmented))
    want = {r["image_id"]: r for r in manifest.read_manifest(clean, "augment").to_pylist()}
    for i, delay in enumerate(MOMENTS["augment"]):
        run = copy_run(augmented, tmp_path / "run")
        shutil.rmtree(run.path("manifests", "augment"))
        log = tmp_path / f"augment-{i}.log"
        proc = start(["augment", "--run", run.url], slow=0.4, part_rows=3, log=log)
        wait_until(ready(log), proc)
        time.sleep(delay)
        assert kill_group(proc), f"augment finished before the kill at {delay}s"
        rows = {r["image_id"]: r for r in manifest.read_manifest(run, "augment").to_pylist()}
        assert all(r == want[k] for k, r in rows.items()) and len(rows) % 3 == 0  # whole parts only
        augment.run(run)
        assert done_once(run, "augment", list(want)) == want
        assert_no_conflicts(run, "augment", ("status", "height", "width", "crop_top", "crop_left", "flip"))


def _maps_match(run: Run, clean: Run) -> None:
    a = FeatureStore.open(run.teacher().store_url)
    b = FeatureStore.open(clean.teacher().store_url)
    for image_id in manifest.read_manifest(run.teacher(), "extract")["image_id"].to_pylist():
        np.testing.assert_allclose(a.read(image_id).astype(np.float32), b.read(image_id).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


def _workers(proc) -> list[psutil.Process]:
    """The live dask worker processes under ``proc``; one killed before and not yet reaped (a zombie) or
    gone since the listing is not one of them."""
    alive = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                alive.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return alive


def test_extract_client_and_workers_killed(tmp_path, augmented, extracted):
    """Two client kills (the whole process group: a machine crash), then a rerun during which a
    worker is killed twice; the rerun still completes and the maps equal a clean run's."""
    clean = Run(str(extracted))
    planned = manifest.read_manifest(clean, "augment")["image_id"].to_pylist()
    run = copy_run(augmented, tmp_path / "run")
    partial = []
    for i, delay in enumerate(MOMENTS["extract-client"]):
        before = parts(run.teacher(), "extract")
        log = tmp_path / f"extract-{i}.log"
        proc = start(["extract", "--run", run.url, "--workers", "1"], slow=0.3, log=log)
        wait_until(lambda: parts(run.teacher(), "extract") > before, proc)
        time.sleep(delay)
        assert kill_group(proc), f"extract finished before the kill at {delay}s"
        rows = assert_maps_intact(run)
        partial.append(len(rows))
        _maps_match(run, clean)
        assert_no_conflicts(run.teacher(), "extract", ("grid_h", "grid_w", "dim", "status"))
    assert 0 < partial[-1] <= IMAGES - 4, partial
    log = tmp_path / "extract-rerun.log"
    proc = start(["extract", "--run", run.url, "--workers", "2"], slow=0.3, log=log)
    killed: list[int] = []
    for k, delay in enumerate(MOMENTS["extract-worker"]):
        if not wait_until(lambda: parts(run.teacher(), "extract") > partial[-1] + k, proc):
            break
        time.sleep(delay)
        workers = [w for w in _workers(proc) if w.pid not in killed]
        if workers and proc.poll() is None:
            workers[0].send_signal(signal.SIGKILL)
            killed.append(workers[0].pid)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert killed, "no worker was killed"
    done_once(run.teacher(), "extract", planned)
    assert_maps_intact(run)
    _maps_match(run, clean)


def _latest_ckpt(run: Run) -> int:
    return max(Checkpointer(run.student(), dict, every=EVERY).entries(), default=0)


def test_train_killed_five_times_resumes_from_last_checkpoint(tmp_path, extracted, caplog):
    run = copy_run(extracted, tmp_path / "run")
    expect_resume: int | None = None
    partial = 0
    for i, delay in enumerate(MOMENTS["train"]):
        if manifest.read_manifest(run.student(), "train").num_rows == EPOCHS:  # finished: start a fresh copy
            run, expect_resume = copy_run(extracted, tmp_path / "run"), None
        before = _latest_ckpt(run)
        log = tmp_path / f"train-{i}.log"
        proc = start(["train", "--run", run.url], log=log)
        wait_until(lambda: _latest_ckpt(run) > before, proc)
        time.sleep(delay)
        kill_group(proc)
        text = log.read_text()
        if expect_resume:
            assert f"resumed from step {expect_resume} " in text, text[-1500:]
        steps = checkpoint_steps(run)  # every checkpoint left behind loads intact
        expect_resume = max(steps, default=None)
        epochs = manifest.read_manifest(run.student(), "train")["epoch"].to_pylist()
        assert sorted(epochs) == list(range(len(epochs)))  # an epoch row only after its epoch
        partial += len(epochs) < EPOCHS
    assert partial >= 1
    with caplog.at_level(logging.INFO, logger="spar_pipeline.train"):
        report = train.run(run, progress=False)  # the rerun, in this process
    if expect_resume:
        assert f"resumed from step {expect_resume} " in caplog.text
        assert report["steps_this_run"] == report["step"] - expect_resume
    assert report["step"] == EPOCHS * report["train_images"]
    rows = sorted(manifest.read_manifest(run.student(), "train").to_pylist(), key=lambda r: r["epoch"])
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, (e + 1) * report["train_images"]) for e in range(EPOCHS)]
    assert_no_conflicts(run.student(), "train", ("step",))
    Checkpointer(run.student(), dict, every=EVERY).load(report["step"])
