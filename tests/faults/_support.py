"""Shared parts of the fault suite: a fault recipe, a prepared run, a killable CLI driver, checks.

Everything here is real: the stages run through the CLI in subprocesses, the store is Zarr on
disk (or moto S3), the cluster is a Dask LocalCluster. The driver may only *slow down* the
parent's manifest writes, so that seeded kill moments land inside the work, not after it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from spar_pipeline import manifest
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.resources import stages_dir
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore

ROOT = Path(__file__).resolve().parents[2]
N_TARS, PER_TAR, SIZE = 4, 3, (96, 64)
IMAGES = N_TARS * PER_TAR
EPOCHS, EVERY = 2, 3

# Runs the real CLI in this process; SPAR_TEST_SLOW_WRITES slows the manifest writes here and, through
# Dask's preload, in the extract workers. argv: AUGMENT_PART_ROWS CLI-ARGS...
DRIVER = """
import sys
import faults._slow
from spar_pipeline import augment
if int(sys.argv[1]):
    augment.PART_ROWS = int(sys.argv[1])
from spar_pipeline.cli import app
print("driver: ready", file=sys.stderr, flush=True)
app(sys.argv[2:], prog_name="spar-pipeline")
"""


def fault_recipe(directory: Path) -> Path:
    """tiny-cpu sized for 12 images and cheap restarts: 2 epochs, a step checkpoint every 3, no
    loader or ingest worker processes, 1 image per extract task (more kill points)."""
    text = (stages_dir() / "tiny-cpu.toml").read_text()
    for key, value in dict(epochs=EPOCHS, checkpoint_every=EVERY, loader_workers=0, holdout_fraction=0.25,
                           images_per_task=1, workers=1).items():
        text, n = re.subn(rf"(?m)^{key} = .*(?:#.*)?$", f"{key} = {value}", text)
        assert n == 1, key
    path = directory / "faults.toml"
    path.write_text(text)
    return path


def copy_run(src: Path, dst: Path) -> Run:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return Run(str(dst))


def env(slow: float = 0.0) -> dict:
    preload = f'["{Path(__file__).with_name("_slow.py")}"]'
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}", COLUMNS="200", HF_HUB_OFFLINE="1",
                SPAR_TEST_SLOW_WRITES=str(slow), DASK_DISTRIBUTED__WORKER__PRELOAD=preload)


def start(args: list[str], slow: float = 0.0, part_rows: int = 0, log: Path | None = None) -> subprocess.Popen:
    """The CLI in a new process group (so a kill takes its workers too, as a machine crash would)."""
    err = open(log, "wb") if log else subprocess.DEVNULL
    cmd = [sys.executable, "-c", DRIVER, str(part_rows), *args]
    return subprocess.Popen(cmd, env=env(slow), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll ``cond`` until true; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.02)
    raise TimeoutError("the stage made no progress")


def ready(log: Path) -> Callable[[], bool]:
    return lambda: log.exists() and b"driver: ready" in log.read_bytes()


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL the process and its children; True when it was still running (the kill landed)."""
    landed = proc.poll() is None
    if landed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return landed


def parts(run: Run, stage: str) -> int:
    return len(manifest._part_names(run, stage))


def raw_rows(run: Run, stage: str) -> list[dict]:
    """Every row of every part, before the latest-row-per-key merge."""
    _, tables = manifest._read_parts(run, stage)
    return [r for t in tables for r in t.to_pylist()]


def assert_no_conflicts(run: Run, stage: str, same: tuple[str, ...]) -> None:
    """Rows written twice for one key (a redo after a kill, a compaction cut short) agree on ``same``."""
    seen: dict = {}
    for r in raw_rows(run, stage):
        key = tuple(r[k] for k in manifest.schema(stage).key)
        value = tuple(r[c] for c in same)
        assert seen.setdefault(key, value) == value, (stage, key, seen[key], value)


def assert_maps_intact(run: Run) -> list[dict]:
    """Every extract row references a readable map of its shape and checksum."""
    rows = manifest.read_manifest(run.teacher(), "extract").to_pylist()
    if rows:
        store = FeatureStore.open(run.teacher().store_url, storage_options=run.storage_options)
        for r in rows:
            assert r["status"] == "ok", r
            assert store.verify(r["image_id"], (r["grid_h"], r["grid_w"], r["dim"]), r["checksum"]) is None, r
    return rows


def done_once(run: Run, stage: str, planned: list[int]) -> dict[int, dict]:
    """Every planned image has exactly one (latest) row in ``stage``."""
    rows = manifest.read_manifest(run, stage).to_pylist()
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == sorted(planned) and len(set(ids)) == len(ids), (stage, sorted(ids), sorted(planned))
    return {r["image_id"]: r for r in rows}


def checkpoint_steps(run: Run) -> list[int]:
    """Steps of the checkpoints that load intact."""
    ck = Checkpointer(run.student(), dict, every=EVERY)
    good = []
    for step in ck.entries():
        ck.load(step)  # raises CheckpointError when damaged: a kill must never leave that behind
        good.append(step)
    return good
