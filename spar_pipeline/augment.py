"""The ``augment`` stage: each pending image's augmentation drawn once and recorded.

It composes :mod:`spar_pipeline.augmentation` (the draw, its row, and the pixels that extract
and train read back) with the manifests. The draw needs only the source size, so the stage
decodes nothing, and a rerun or a resumed kill ends with the same rows (the draw is pure).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from spar_pipeline import manifest
from spar_pipeline.augmentation import augment_row
from spar_pipeline.errors import RunError
from spar_pipeline.run import Run

__all__ = ["run"]

log = logging.getLogger(__name__)
PART_ROWS = 1000


def run(run_dir: Run, *, limit: int | None = None) -> dict[str, Any]:
    """Draw every pending image's augmentation; append rows in parts of ≤ PART_ROWS.

    Decodes nothing (the draw needs only the source size). Rerunning does nothing new, and a
    killed run, rerun, ends with the same rows as an uninterrupted one (the draw is pure).
    """
    t0, started = time.perf_counter(), time.time()
    recipe = run_dir.recipe
    ingested = manifest.read_manifest(run_dir, "ingest")
    if not ingested.num_rows:
        raise RunError(f"{run_dir}: nothing ingested yet; run `spar-pipeline ingest SOURCES --run {run_dir.url}` first")
    todo = manifest.pending(ingested, manifest.read_manifest(run_dir, "augment"))
    ingest_rows = todo.to_pylist()[:limit] if limit else todo.to_pylist()
    done = rejected = 0
    for start in range(0, len(ingest_rows), PART_ROWS):
        rows = [augment_row(recipe.recipe.seed, recipe.augment, recipe.ingest.max_pixels, r)
                for r in ingest_rows[start:start + PART_ROWS]]
        manifest.write_part(run_dir, "augment", rows)
        for r in rows:
            if r["status"] == "ok":
                done += 1
            else:
                rejected += 1
                log.warning("augment: image %d: %s; rejected", r["image_id"], r["reason"])
    manifest.compact(run_dir, "augment")
    manifest.record_invocation(run_dir, "augment", started, done, rejected)
    report = dict(done=done, rejected=rejected, seconds=round(time.perf_counter() - t0, 2))
    log.info("augment: %s", report)
    return report
