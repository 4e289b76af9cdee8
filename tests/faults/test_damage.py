"""Damage found after the fact: detected, reported one line each, redone by the next run.

Beyond tests/e2e/test_cli.py (a zeroed chunk), tests/unit/test_manifest.py (a torn part alone) and
tests/unit/test_train.py (a flipped checkpoint byte at resume): a deleted map, a deleted chunk,
damaged map metadata and a torn extract part in one run, all redone by one extract; and
``verify`` on checkpoints (a torn tensor file, a deleted one, a torn JSON marker).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from spar_pipeline import extract, manifest, train
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.split import training_items
from spar_pipeline.verify import verify

from faults._support import EVERY, assert_maps_intact, copy_run, done_once


def test_damaged_maps_and_torn_part_are_redone(tmp_path, extracted, caplog):
    run = copy_run(extracted, tmp_path / "run")
    planned = manifest.read_manifest(run, "augment")["image_id"].to_pylist()
    ids = sorted(manifest.read_manifest(run.teacher(), "extract")["image_id"].to_pylist())
    maps = Path(run.teacher().path("features.zarr", "maps"))
    gone, no_chunk, bad_meta = ids[0], ids[1], ids[2]
    shutil.rmtree(maps / str(gone))
    shutil.rmtree(maps / str(no_chunk) / "c")
    (maps / str(bad_meta) / "zarr.json").write_text("{torn")
    with caplog.at_level(logging.WARNING, logger="spar_pipeline.verify"):
        report = verify(run)
    assert report["extract"] == dict(checked=len(ids), damaged=3) and not report["repaired"]
    lines = {i: [m for m in caplog.messages if f"image {i}:" in m] for i in (gone, no_chunk, bad_meta)}
    assert all(len(v) == 1 for v in lines.values()), lines
    assert lines[gone][0].endswith(": missing") and lines[no_chunk][0].endswith(": missing chunk")
    assert "unreadable" in lines[bad_meta][0]
    # a torn extract part: quarantined on read, its images count as not done
    part = sorted(Path(run.teacher().path("manifests", "extract")).glob("part-*.parquet"))[-1]
    torn_ids = set(pq.read_table(part).column("image_id").to_pylist())
    part.write_bytes(part.read_bytes()[:40])
    assert verify(run, repair=True)["repaired"]
    assert (Path(run.teacher().path("manifests", "extract", "quarantine")) / part.name).exists()
    redo = {r["image_id"] for r in manifest.read_manifest(run.teacher(), "extract").to_pylist() if r["status"] == "redo"}
    assert redo == {gone, no_chunk, bad_meta} - torn_ids
    report = extract.run(run, workers=1, progress=False)
    assert report["done"] == len(redo | torn_ids)
    done_once(run.teacher(), "extract", planned)
    assert_maps_intact(run)
    assert verify(run)["extract"]["damaged"] == 0


def test_verify_checks_checkpoints_and_repair_quarantines(tmp_path, extracted, caplog):
    run = copy_run(extracted, tmp_path / "run")
    n_train = len(training_items(run)[0])
    train.run(run, progress=False, stop_after_steps=n_train + 2 * EVERY + 1)  # the epoch end + 2 step checkpoints
    ck = Checkpointer(run.student(), dict, every=EVERY)
    steps = ck.entries()
    assert len(steps) >= 3 and n_train in steps
    folder = Path(run.student().path("checkpoints"))
    torn = folder / f"ckpt-{steps[-1]:09d}.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    (folder / f"ckpt-{steps[-2]:09d}.json").write_text("{torn")
    with caplog.at_level(logging.WARNING, logger="spar_pipeline.verify"):
        report = verify(run)
    assert report["checkpoints"] == dict(checked=len(steps), damaged=2)
    lines = [m for m in caplog.messages if m.startswith("verify: checkpoint")]
    assert len(lines) == 2 and any("damaged" in m for m in lines) and any("JSON" in m for m in lines), lines
    assert verify(run, repair=True)["repaired"]
    assert ck.entries() == steps[:-2] and sorted(p.name for p in (folder / "quarantine").iterdir()) == sorted(
        f"ckpt-{s:09d}.json" for s in steps[-2:])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        entry, _ = ck.load_latest()  # training resumes from the newest intact one, no warning left
    assert entry.step == steps[-3] and "damaged" not in caplog.text
    assert verify(run)["checkpoints"] == dict(checked=len(steps) - 2, damaged=0)
