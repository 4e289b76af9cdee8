"""``spar-pipeline verify``: check every manifest row against what it references.

Ingest rows: the tar member's bytes and checksum. Extract rows: the stored map's shape and
checksum. Checkpoints: each one's tensor file against the size and sha256 its JSON records.
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


def _check_checkpoints(run: Run, repair: bool) -> dict[str, int]:
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

    extract = [r for r in manifest.read_manifest(run, "extract").to_pylist() if r["status"] == "ok"]
    bad_extract: list[tuple[dict, str]] = []
    if extract:
        from spar_pipeline.store import FeatureStore

        try:
            store = FeatureStore.open(run.store_url, storage_options=run.storage_options)
            with ThreadPoolExecutor(threads) as pool:
                problems = list(pool.map(
                    lambda r: store.verify(r["image_id"], (r["grid_h"], r["grid_w"], r["dim"]), r["checksum"]), extract))
        except FileNotFoundError:
            problems = ["feature store missing"] * len(extract)
        bad_extract = [(r, p) for r, p in zip(extract, problems) if p]
    report["extract"] = dict(checked=len(extract), damaged=len(bad_extract))

    for stage, bad in (("ingest", bad_ingest), ("extract", bad_extract)):
        for r, p in bad:
            log.warning("verify: %s image %s: %s", stage, r["image_id"], p)
        if repair and bad:
            manifest.write_part(run, stage, [dict(r, status="redo", reason=f"verify: {p}") for r, p in bad])
    if repair and bad_ingest:
        # an image whose source bytes are damaged must also be re-augmented and re-extracted
        ids = {r["image_id"] for r, _ in bad_ingest}
        tars = {r["source"] for r, _ in bad_ingest}
        log.warning("verify: %d damaged tar member(s) in %s; re-ingest those tars to redo them", len(ids),
                    ", ".join(redact(t) for t in sorted(tars)))
    report["checkpoints"] = _check_checkpoints(run, repair)
    report["repaired"] = bool(repair and (bad_ingest or bad_extract or report["checkpoints"]["damaged"]))
    return report
