"""The ``ingest`` stage: index SA-1B tars in place and validate every image once.

One unit of work per tar: walk it, decode each image with the one decode function, check it
against its JSON sidecar, append one ingest part with the tar's image rows and then a row in
the ``tars`` manifest, the tar's completion marker. Rerunning skips completed tars.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from spar_pipeline import manifest
from spar_pipeline.fsutil import redact
from spar_pipeline.imageio import ImageRejected, decode_image
from spar_pipeline.run import Run
from spar_pipeline.sources import TarIndex, iter_tar, resolve_sources

__all__ = ["run", "ingest_tar"]

log = logging.getLogger(__name__)


def _row(url: str, member, status: str = "ok", reason: str = "", w: int = 0, h: int = 0, checksum: str = "") -> dict:
    return dict(image_id=member.image_id, source=url, member=member.name, offset=member.offset, size=member.size,
                width=w, height=h, checksum=checksum, status=status, reason=reason)


def _check_sidecar(data: bytes | None, w: int, h: int) -> str:
    """'' when the sidecar agrees (or is absent: the JPEG is the data), else the reason."""
    if data is None:
        return ""
    try:
        meta = json.loads(data)["image"]
        sw, sh = int(meta["width"]), int(meta["height"])
    except (ValueError, KeyError, TypeError):
        return "JSON sidecar malformed"
    if (sw, sh) != (w, h):
        return f"size {w}×{h} disagrees with JSON sidecar {sw}×{sh}"
    return ""


def ingest_tar(url: str, max_id: int, max_pixels: int, storage_options: dict | None = None) -> tuple[list[dict], TarIndex]:
    """Rows for every ``sa_<id>.jpg`` of one tar (ok or rejected with a reason)."""
    index = TarIndex()
    name = redact(url).rsplit("/", 1)[-1]
    images: dict[int, dict] = {}
    sidecars: dict[int, bytes] = {}
    for member, data in iter_tar(url, storage_options, index):
        if max_id and member.image_id > max_id:
            continue
        if member.kind == "json":
            sidecars[member.image_id] = data
            continue
        if member.image_id in images:
            index.warnings.append(f"{name}: {member.name}: duplicate image id {member.image_id} in the tar; first kept")
            continue
        checksum = hashlib.sha256(data).hexdigest()[:32]
        try:
            h, w = decode_image(data, max_pixels).shape[:2]
            images[member.image_id] = _row(url, member, w=w, h=h, checksum=checksum)
        except ImageRejected as e:
            images[member.image_id] = _row(url, member, "rejected", str(e), checksum=checksum)
    rows = []
    for image_id, row in sorted(images.items()):
        if row["status"] == "ok":
            problem = _check_sidecar(sidecars.get(image_id), row["width"], row["height"])
            if problem:
                row.update(status="rejected", reason=problem)
        if row["status"] == "rejected":
            index.warnings.append(f"{name}: {row['member']}: {row['reason']}; rejected")
        rows.append(row)
    return rows, index


def run(
    run: Run,
    sources: list[str],
    *,
    links: str | None = None,
    tars: list[str] | None = None,
    max_id: int | None = None,
    limit: int | None = None,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = run.recipe.ingest
    max_id = cfg.max_id if max_id is None else max_id
    options = storage_options if storage_options is not None else run.storage_options
    urls = resolve_sources(sources, links, tars, options, download_dir=run.url_for("source") if links else None)
    existing = manifest.read_manifest(run, "ingest").to_pylist()
    redo = {r["source"] for r in existing if r["status"] == "redo"}  # marked by verify --repair
    done_sources = set(manifest.read_manifest(run, "tars")["source"].to_pylist()) - redo
    known_ids = {r["image_id"]: r["source"] for r in existing if r["status"] != "redo"}
    todo = [u for u in urls if u not in done_sources]
    report = dict(tars=len(urls), skipped_tars=len(urls) - len(todo), failed_tars=0, ok=0, rejected=0, duplicates=0)
    if not todo:
        log.info("ingest: nothing to do (%d tars already ingested)", len(urls))
        return dict(report, seconds=round(time.perf_counter() - t0, 2))
    workers = max(1, min(cfg.workers, len(todo)))
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(ingest_tar, u, max_id, cfg.max_pixels, options) for u in todo]
        new = 0
        for url, fut in zip(todo, futures):  # in source order, so the first of duplicate ids wins
            name = redact(url)
            try:
                rows, index = fut.result()
            except Exception as e:  # unreadable tar: one line, the others go on
                log.error("ingest: %s: %s", name, redact(str(e)).splitlines()[0] if str(e) else type(e).__name__)
                report["failed_tars"] += 1
                continue
            for w in index.warnings:
                log.warning("ingest: %s", w)
            if index.error:
                log.warning("ingest: %s: %s; keeping the %d images before it", name, index.error, len(rows))
            fresh = []
            for r in rows:
                if known_ids.get(r["image_id"]) == url:  # rowed before a crash, tar not marked done
                    continue
                if r["image_id"] in known_ids:
                    log.warning("ingest: %s: %s: image id %d already ingested from %s; skipped", name, r["member"],
                                r["image_id"], redact(known_ids[r["image_id"]]))
                    report["duplicates"] += 1
                    continue
                known_ids[r["image_id"]] = url
                fresh.append(r)
            manifest.write_part(run, "ingest", fresh)
            manifest.write_part(run, "tars", [dict(source=url, images=len(rows), ignored=index.ignored,
                                                   error=index.error)])
            ok = sum(r["status"] == "ok" for r in fresh)
            report["ok"] += ok
            report["rejected"] += len(fresh) - ok
            new += len(fresh)
            log.info("ingest: %s: %d images ok, %d rejected, %d other members ignored", name, ok, len(fresh) - ok,
                     index.ignored)
            if limit and new >= limit:
                for f in futures:
                    f.cancel()
                break
    manifest.compact(run, "ingest")
    manifest.compact(run, "tars")
    return dict(report, seconds=round(time.perf_counter() - t0, 2))
