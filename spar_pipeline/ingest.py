"""The ``ingest`` stage: index SA-1B tars in place and validate every image once.

One unit of work per tar: walk it, decode each image with the one decode function, check it
against its JSON sidecar; then the parent appends one ``ingest`` part with the tar's rows and
one ``tars`` row, the tar's completion marker. Rerunning skips completed tars; a tar killed
between the two writes is redone without writing its rows twice. Results are taken in
sorted source order, so when two tars hold the same image id the first one's row is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import re
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Iterator

from spar_pipeline import manifest
from spar_pipeline.errors import first_line
from spar_pipeline.imageio import ImageRejected, decode_image, orientation
from spar_pipeline.run import Run
from spar_pipeline.sources import SourceError, TarIndex, iter_tar, resolve_sources, show_url

__all__ = ["run", "ingest_tar"]

log = logging.getLogger(__name__)
# SA-1B sidecars start with the image record; the mask annotations after it can be megabytes
# and are not needed here, so only that record is parsed (the whole file when it is not first).
_IMAGE_RECORD = re.compile(rb'\A\s*\{\s*"image"\s*:\s*(\{[^{}]*\})')


def _row(url: str, member, status: str = "ok", reason: str = "", w: int = 0, h: int = 0, checksum: str = "") -> dict:
    return dict(image_id=member.image_id, source=url, member=member.name, offset=member.offset, size=member.size,
                width=w, height=h, checksum=checksum, status=status, reason=reason)


def _few(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")


def _sidecar_problem(data: bytes, image_id: int, w: int, h: int, turned: bool = False) -> str:
    """'' when the sidecar agrees with the decoded image (``turned``: EXIF swapped its sides, so the
    stored h×w agrees too), else the rejection reason."""
    try:
        if not data.rstrip().endswith(b"}"):
            raise ValueError("truncated")
        m = _IMAGE_RECORD.match(data[:8192])
        meta = json.loads(m.group(1)) if m else json.loads(data)["image"]
        sid, sw, sh = int(meta["image_id"]), int(meta["width"]), int(meta["height"])
    except (ValueError, KeyError, TypeError) as e:
        return f"JSON sidecar malformed ({first_line(e)})"
    if sid != image_id:
        return f"JSON sidecar names image {sid}, not {image_id}"
    if (sw, sh) != (w, h) and not (turned and (sw, sh) == (h, w)):
        return f"size {w}×{h} disagrees with JSON sidecar {sw}×{sh}"
    return ""


def ingest_tar(
    url: str, max_id: int, max_pixels: int, storage_options: dict | None = None
) -> tuple[list[dict], TarIndex]:
    """Rows for every ``sa_<id>.jpg`` of one tar (ok, or rejected with a reason), in id order.

    ``index.warnings`` holds one line per problem, for the parent to log; nothing here raises
    for bad content (an unreadable tar raises, or sets ``index.error`` when it breaks midway).
    """
    index = TarIndex()
    name = show_url(url).rsplit("/", 1)[-1]
    images: dict[int, dict] = {}
    sidecars: dict[int, bytes] = {}
    repeated: list[str] = []
    turned: set[int] = set()  # EXIF orientation 5–8: decoded with width and height swapped
    keep = (lambda i: i <= max_id) if max_id else None
    for member, data in iter_tar(url, storage_options, index, keep):
        if member.kind == "json":
            sidecars.setdefault(member.image_id, data)
            continue
        if member.image_id in images:
            repeated.append(member.name)
            continue
        checksum = hashlib.sha256(data).hexdigest()[:32]
        try:
            h, w = decode_image(data, max_pixels).shape[:2]
            images[member.image_id] = _row(url, member, w=w, h=h, checksum=checksum)
            if orientation(data) >= 5:
                turned.add(member.image_id)
        except ImageRejected as e:
            images[member.image_id] = _row(url, member, "rejected", str(e), checksum=checksum)
    if repeated:
        index.warnings.append(f"{name}: {len(repeated)} repeated member(s) ({_few(repeated, 3)}); "
                              "the first of each id is kept")
    if index.suspicious:
        shown = _few(index.suspicious, 4)
        index.warnings.append(f"{name}: ignored {shown}; never followed or extracted")
    orphans = sorted(set(sidecars) - set(images))
    if orphans:
        index.warnings.append(
            f"{name}: {len(orphans)} JSON sidecar(s) without an image ({_few([f'sa_{i}.json' for i in orphans], 3)}); ignored")
    rows = []
    for image_id, row in sorted(images.items()):
        if row["status"] == "ok" and image_id in sidecars:  # no sidecar: the JPEG is the data, accept
            problem = _sidecar_problem(sidecars[image_id], image_id, row["width"], row["height"],
                                       turned=image_id in turned)
            if problem:
                row.update(status="rejected", reason=problem, width=0, height=0)
        if row["status"] == "rejected":
            index.warnings.append(f"{name}: {row['member']}: {row['reason']}; rejected")
        rows.append(row)
    return rows, index


def _outcomes(todo: list[str], workers: int, args: tuple) -> Iterator[tuple[str, Any]]:
    """(url, (rows, index) or the exception) per tar, in ``todo`` order, ``workers`` tars at a time."""
    if workers <= 1 or len(todo) <= 1:
        for url in todo:
            try:
                yield url, ingest_tar(url, *args)
            except Exception as e:  # an unreadable tar never stops the others
                yield url, e
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def submit(url: str) -> Future:
        try:
            return pool.submit(ingest_tar, url, *args)
        except Exception as e:  # the pool broke (a worker died): this tar fails, the loop goes on
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    queue: deque[tuple[str, Future]] = deque()
    rest = iter(todo)
    try:
        for url in rest:
            queue.append((url, submit(url)))
            if len(queue) > workers:
                break
        while queue:
            url, fut = queue.popleft()
            try:
                outcome = fut.result()
            except Exception as e:  # includes a worker killed by the OS (BrokenProcessPool)
                outcome = e
            nxt = next(rest, None)
            if nxt is not None:
                queue.append((nxt, submit(nxt)))
            yield url, outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    """Ingest the tars named by ``sources`` (and/or ``links`` + ``tars``) into ``run``'s manifest.

    ``max_id``: keep ``sa_<id>`` with id ≤ max_id (None: the recipe's; 0: all). ``limit``: stop
    after the tar that brings this invocation's new rows to at least ``limit``.
    Returns a report: tars, skipped_tars, failed_tars, ok, rejected, duplicates, seconds.
    """
    t0, started = time.perf_counter(), time.time()
    cfg = run.recipe.ingest
    max_id = cfg.max_id if max_id is None else max_id
    options = storage_options if storage_options is not None else run.storage_options
    resolved = resolve_sources(sources, links, tars, options, download_dir=run.url_for("source"))
    urls = resolved.urls
    if not urls:
        raise SourceError("no SA-1B tars to ingest" + (f": {'; '.join(resolved.failed)}" if resolved.failed else ""))
    existing = manifest.read_manifest(run, "ingest").to_pylist()
    redo = {r["source"] for r in existing if r["status"] == "redo"}  # marked by verify --repair
    done_sources = set(manifest.read_manifest(run, "tars")["source"].to_pylist()) - redo
    owner = {r["image_id"]: r["source"] for r in existing if r["status"] != "redo"}
    todo = [u for u in urls if u not in done_sources]
    report = dict(tars=len(urls), skipped_tars=len(urls) - len(todo), failed_tars=len(resolved.failed),
                  ok=0, rejected=0, duplicates=0)
    if not todo:
        log.info("ingest: nothing to do (%d tar(s) already ingested)", len(urls))
        return dict(report, seconds=round(time.perf_counter() - t0, 2))
    workers = max(1, min(cfg.workers, len(todo)))
    log.info("ingest: %d tar(s) to index and validate (%d already done), %d worker(s)%s", len(todo),
             report["skipped_tars"], workers, f", ids ≤ {max_id}" if max_id else "")
    new = 0
    outcomes = _outcomes(todo, workers, (max_id, cfg.max_pixels, options))
    for url, outcome in outcomes:
        where = show_url(url)
        if isinstance(outcome, BaseException):
            log.error("ingest: %s: unreadable tar (%s); no rows written, the other tars go on", where, first_line(outcome, typed=True))
            report["failed_tars"] += 1
            continue
        rows, index = outcome
        if index.error and not rows and not index.ignored and not index.filtered:
            log.error("ingest: %s: %s; no rows written, the other tars go on", where, index.error)
            report["failed_tars"] += 1
            continue
        for line in index.warnings:
            log.warning("ingest: %s", line)
        if index.error:
            log.warning("ingest: %s: %s; keeping the %d image(s) before it", where, index.error, len(rows))
        fresh, clashes = [], {}
        for r in rows:
            first = owner.get(r["image_id"])
            if first == url:  # rowed before a crash, the tar's marker never written
                continue
            if first is not None:
                clashes.setdefault(first, []).append(r["member"])
                continue
            owner[r["image_id"]] = url
            fresh.append(r)
        for first, members in clashes.items():
            log.warning("ingest: %s: %d image id(s) already ingested from %s (%s); the first tar's rows are kept",
                        where, len(members), show_url(first), _few(members, 3))
            report["duplicates"] += len(members)
        manifest.write_part(run, "ingest", fresh)
        manifest.write_part(run, "tars", [dict(source=url, images=len(rows), ignored=index.ignored, error=index.error)])
        ok = sum(r["status"] == "ok" for r in fresh)
        report["ok"] += ok
        report["rejected"] += len(fresh) - ok
        new += len(fresh)
        extra = [f"{index.ignored} other member(s) ignored"] if index.ignored else []
        extra += [f"{index.filtered} above max id {max_id} skipped"] if index.filtered else []
        log.info("ingest: %s: %d ok, %d rejected%s", where, ok, len(fresh) - ok, "".join(f", {e}" for e in extra))
        if limit and new >= limit:
            log.info("ingest: --limit %d reached after %d new image(s); stopping", limit, new)
            break
    outcomes.close()  # stops the worker pool now, not when garbage-collected
    manifest.compact(run, "ingest")
    manifest.compact(run, "tars")
    manifest.record_invocation(run, "ingest", started, report["ok"], report["rejected"])
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("ingest: done: %(ok)d ok, %(rejected)d rejected, %(duplicates)d duplicate ids, "
             "%(failed_tars)d tar(s) failed, %(skipped_tars)d skipped, %(seconds).1f s", report)
    return report
