"""``spar-pipeline verify``: check every manifest row against what it references.

Ingest rows: the tar member's bytes and checksum. Extract rows (every teacher's): the stored map's
shape and checksum. Checkpoints (every student's): each one's tensor file against the size and
sha256 its JSON records.
With ``repair``, damaged items get a ``redo`` row (the latest row wins), so the next run of
that stage redoes them, and a damaged checkpoint's JSON marker moves to
``checkpoints/quarantine/``, so training resumes from the newest intact one; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from spar_pipeline import manifest
from spar_pipeline.errors import first_line
from spar_pipeline.fsutil import redact
from spar_pipeline.run import Run

__all__ = ["verify"]

log = logging.getLogger(__name__)


def _check_ingest(row: dict, storage_options: dict) -> str | None:
    from spar_pipeline.sources import read_member

    try:
        data = read_member(row["source"], row["offset"], row["size"], storage_options)
    except (OSError, ValueError) as e:
        return f"tar member unreadable ({first_line(e)})"
    if hashlib.sha256(data).hexdigest()[:32] != row["checksum"]:
        return "tar member checksum mismatch"
    return None


def _check_checkpoints(run, repair: bool) -> dict[str, int]:
    """``run``: a student's folder."""
    from spar_pipeline.checkpoint import FOLDER, CheckpointError, Checkpointer

    ck = Checkpointer(run, dict, every=1)
    steps = ck.entries()
    damaged = 0
    for step in steps:
        try:
            ck.load(step)
            continue
        except (CheckpointError, FileNotFoundError, KeyError) as e:
            damaged += 1
            log.warning("verify: checkpoint at step %d: %s", step, first_line(e))
        if repair:
            name = f"ckpt-{step:09d}.json"
            run.fs.makedirs(run.path(FOLDER, "quarantine"), exist_ok=True)
            run.fs.mv(run.path(FOLDER, name), run.path(FOLDER, "quarantine", name))
    return dict(checked=len(steps), damaged=damaged)


def verify(run: Run, repair: bool = False, threads: int = 8) -> dict[str, Any]:
    """Counts of checked and damaged rows per stage; with ``repair``, damaged rows become ``redo``."""
    report: dict[str, Any] = {}
    ingest = [r for r in manifest.read_manifest(run, "ingest").to_pylist() if r["status"] == "ok"]
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda r: _check_ingest(r, run.storage_options), ingest))
    bad_ingest = [(r, p) for r, p in zip(ingest, problems) if p]
    report["ingest"] = dict(checked=len(ingest), damaged=len(bad_ingest))

    checked, bad_extract = 0, []
    for name in run.teachers():  # every teacher's maps against its own extract manifest
        teacher = run.teacher(name)
        extract = [r for r in manifest.read_manifest(teacher, "extract").to_pylist() if r["status"] == "ok"]
        checked += len(extract)
        if extract:
            from spar_pipeline.store import FeatureStore

            try:
                store = FeatureStore.open(teacher.store_url, storage_options=run.storage_options)
                with ThreadPoolExecutor(threads) as pool:
                    problems = list(pool.map(lambda r: store.verify(
                        r["image_id"], (r["grid_h"], r["grid_w"], r["dim"]), r["checksum"]), extract))
            except FileNotFoundError:
                problems = ["feature store missing"] * len(extract)
            bad = [(r, p) for r, p in zip(extract, problems) if p]
            for r, p in bad:
                log.warning("verify: teacher %s image %s: %s", name, r["image_id"], p)
            if repair and bad:
                manifest.write_part(teacher, "extract", [dict(r, status="redo", reason=f"verify: {p}") for r, p in bad])
            bad_extract += bad
    report["extract"] = dict(checked=checked, damaged=len(bad_extract))

    for r, p in bad_ingest:
        log.warning("verify: ingest image %s: %s", r["image_id"], p)
    if repair and bad_ingest:
        manifest.write_part(run, "ingest", [dict(r, status="redo", reason=f"verify: {p}") for r, p in bad_ingest])
    if repair and bad_ingest:
        # an image whose source bytes are damaged must also be re-augmented and re-extracted
        ids = {r["image_id"] for r, _ in bad_ingest}
        tars = {r["source"] for r, _ in bad_ingest}
        log.warning("verify: %d damaged tar member(s) in %s; re-ingest those tars to redo them", len(ids),
                    ", ".join(redact(t) for t in sorted(tars)))
    counts = [_check_checkpoints(run.student(name), repair) for name in run.students()]
    report["checkpoints"] = {k: sum(c[k] for c in counts) for k in ("checked", "damaged")}
    report["repaired"] = bool(repair and (bad_ingest or bad_extract or report["checkpoints"]["damaged"]))
    return report
