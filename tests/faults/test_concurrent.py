"""Two processes running the same stage on the same run at the same time end as one clean run.

Both are the real CLI, started together; manifest writes are slowed in both so their work
overlaps. Rows may be written twice (each process planned the same work), never differently,
and the latest-row-per-key merge gives exactly the clean run's rows and maps.
"""

from __future__ import annotations

import shutil

import numpy as np

from spar_pipeline import augment, ingest, manifest
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore

from faults._support import assert_maps_intact, assert_no_conflicts, copy_run, done_once, start


def _both(args: list[str], tmp_path, name: str, **kw) -> None:
    logs = [tmp_path / f"{name}-{i}.log" for i in range(2)]
    procs = [start(args, log=log, **kw) for log in logs]
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def _rows(run: Run, stage: str) -> dict:
    return {r["image_id"]: r for r in manifest.read_manifest(run, stage).to_pylist()}


def test_two_ingests_and_two_augments_at_once(tmp_path, source, augmented):
    clean = Run(str(augmented))
    run = copy_run(augmented, tmp_path / "run")
    for stage in ("ingest", "tars", "augment"):
        shutil.rmtree(run.path("manifests", stage))
    _both(["ingest", str(source), "--run", run.url], tmp_path, "ingest", slow=0.3)
    assert _rows(run, "ingest") == _rows(clean, "ingest")
    key = lambda t: t["source"]  # noqa: E731
    assert sorted(manifest.read_manifest(run, "tars").to_pylist(), key=key) == sorted(
        manifest.read_manifest(clean, "tars").to_pylist(), key=key)
    assert_no_conflicts(run, "ingest", ("source", "offset", "size", "checksum", "status"))
    _both(["augment", "--run", run.url], tmp_path, "augment", slow=0.2, part_rows=3)
    assert _rows(run, "augment") == _rows(clean, "augment")
    assert_no_conflicts(run, "augment", ("status", "height", "width", "crop_top", "crop_left", "flip"))


def test_two_extracts_at_once(tmp_path, source, extracted):
    """On the tiny-cpu recipe itself (4 images per task: windows of several images batched together)."""
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    ingest.run(run, [str(source)])
    augment.run(run)
    planned = list(_rows(run, "augment"))
    _both(["extract", "--run", run.url, "--workers", "1"], tmp_path, "extract", slow=0.3)
    done_once(run.teacher(), "extract", planned)
    rows = assert_maps_intact(run)  # the map in the store is the one its latest row describes
    assert_no_conflicts(run.teacher(), "extract", ("grid_h", "grid_w", "dim", "status"))
    mine, clean = FeatureStore.open(run.teacher().store_url), FeatureStore.open(Run(str(extracted)).teacher().store_url)
    for r in rows:  # the same teacher maps as a clean run of the fault recipe (1 image per task)
        np.testing.assert_allclose(mine.read(r["image_id"]).astype(np.float32),
                                   clean.read(r["image_id"]).astype(np.float32), rtol=2e-3, atol=2e-3)
