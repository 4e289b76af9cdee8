"""The ``ingest`` stage: index tars and image files in place and validate every image once.

One unit of work per tar: walk it, decode each image with the one decode function, check it
against its JSON sidecar (SA-1B) or group it into samples (a WebDataset shard, ``wds``); then
the parent appends one ``ingest`` part with the tar's rows and one ``tars`` row, the tar's
completion marker. Rerunning skips completed tars; a tar killed between the two writes is
redone without writing its rows twice. Results are taken in sorted source order, so when two
tars hold the same image id the first one's row is kept. Image files (folders, globs, the
benchmarks' train splits) go in batches of ``FILE_BATCH``, one part each; their rows are their
completion, so a rerun reads only the files without a row, and a grown folder adds its new files.
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
from spar_pipeline.image_files import dataset_images, file_rows, parse_dataset
from spar_pipeline.ingest_rows import choose_sample, stable_id
from spar_pipeline.run import Run
from spar_pipeline.sources import ImageFile, SourceError, TarIndex, index_tar, iter_tar, resolve_sources, show_url
from spar_pipeline.wds import is_sa1b_tar, wds_candidates, wds_rows

__all__ = ["run", "ingest_tar"]

log = logging.getLogger(__name__)
FILE_BATCH = 128  # image files per unit of work (one manifest part each)
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
    url: str, max_id: int, max_pixels: int, storage_options: dict | None = None, only: frozenset[int] | None = None
) -> tuple[list[dict], TarIndex]:
    """Rows for every ``sa_<id>.jpg`` of one tar (ok, or rejected with a reason), in id order;
    a tar not named ``sa_<digits>.tar`` is a WebDataset shard (``wds.wds_rows``). ``only``: the
    ids to read (a ``--sample``), instead of those up to ``max_id``.

    ``index.warnings`` holds one line per problem, for the parent to log; nothing here raises
    for bad content (an unreadable tar raises, or sets ``index.error`` when it breaks midway).
    """
    if not is_sa1b_tar(url):
        return wds_rows(url, max_pixels, storage_options, only)
    index = TarIndex()
    name = show_url(url).rsplit("/", 1)[-1]
    images: dict[int, dict] = {}
    sidecars: dict[int, bytes] = {}
    repeated: list[str] = []
    turned: set[int] = set()  # EXIF orientation 5–8: decoded with width and height swapped
    keep = (lambda i: i in only) if only is not None else (lambda i: i <= max_id) if max_id else None
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


Unit = tuple  # ("tar", url, ids to read or None) or ("files", [(ImageFile, id), ...])


def _work(unit: Unit, max_id: int, max_pixels: int, storage_options: dict | None) -> tuple[list[dict], Any]:
    """One unit of work, in a worker process or here: (rows, TarIndex) or (rows, warning lines)."""
    if unit[0] == "tar":
        _, url, only = unit
        return ingest_tar(url, max_id, max_pixels, storage_options, *(() if only is None else (only,)))
    return file_rows(unit[1], max_pixels, storage_options)


def _outcomes(todo: list[Unit], workers: int, args: tuple) -> Iterator[tuple[Unit, Any]]:
    """(unit, its result or the exception) per unit, in ``todo`` order, ``workers`` units at a time."""
    if workers <= 1 or len(todo) <= 1:
        for unit in todo:
            try:
                yield unit, _work(unit, *args)
            except Exception as e:  # an unreadable tar never stops the others
                yield unit, e
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def submit(unit: Unit) -> Future:
        try:
            return pool.submit(_work, unit, *args)
        except Exception as e:  # the pool broke (a worker died): this unit fails, the loop goes on
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    queue: deque[tuple[Unit, Future]] = deque()
    rest = iter(todo)
    try:
        for unit in rest:
            queue.append((unit, submit(unit)))
            if len(queue) > workers:
                break
        while queue:
            unit, fut = queue.popleft()
            try:
                outcome = fut.result()
            except Exception as e:  # includes a worker killed by the OS (BrokenProcessPool)
                outcome = e
            nxt = next(rest, None)
            if nxt is not None:
                queue.append((nxt, submit(nxt)))
            yield unit, outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tar_candidates(url: str, max_id: int, storage_options: dict | None) -> tuple[list[int], str]:
    """(ids a ``--sample`` ranks in one tar, why its walk stopped early), from its headers alone."""
    index = TarIndex()
    if not is_sa1b_tar(url):
        return wds_candidates(url, storage_options, index), index.error
    ids = {m.image_id for m in index_tar(url, storage_options, index) if m.kind == "jpg"}
    return sorted(i for i in ids if not max_id or i <= max_id), index.error


def _sample(urls: list[str], files: dict[int, ImageFile], n: int, seed: int, max_id: int, options: dict | None,
            report: dict) -> tuple[dict[int, ImageFile], dict[str, frozenset[int]]]:
    """``--sample n --seed seed`` over every candidate: the files kept, and per tar the ids to read."""
    candidates: dict[str, list[int]] = {}
    for url in urls:
        try:
            ids, error = _tar_candidates(url, max_id, options)
        except Exception as e:  # an unreadable tar never stops the others
            ids, error = [], f"unreadable tar ({first_line(e, typed=True)})"
        if error and not ids:
            log.error("ingest: %s: %s; no rows written, the other tars go on", show_url(url), error)
            report["failed_tars"] += 1
            continue
        candidates[url] = ids  # a damaged tar: the ids before the damage (its walk warns later)
    total = len(files) + sum(len(ids) for ids in candidates.values())
    chosen = choose_sample([*files, *(i for ids in candidates.values() for i in ids)], n, seed)
    log.info("ingest: --sample %d --seed %d: %d of %d candidate image(s)", n, seed, len(chosen), total)
    return ({i: f for i, f in files.items() if i in chosen},
            {u: frozenset(i for i in ids if i in chosen) for u, ids in candidates.items()})


def _take_tar(run: Run, unit: Unit, outcome: Any, owner: dict[int, str], report: dict, max_id: int) -> int:
    """Log and write one tar's outcome (its rows, then its completion marker); the new row count."""
    _, url, only = unit
    where = show_url(url)
    if isinstance(outcome, BaseException):
        log.error("ingest: %s: unreadable tar (%s); no rows written, the other tars go on", where,
                  first_line(outcome, typed=True))
        report["failed_tars"] += 1
        return 0
    rows, index = outcome
    if index.error and not rows and not index.ignored and not index.filtered:
        log.error("ingest: %s: %s; no rows written, the other tars go on", where, index.error)
        report["failed_tars"] += 1
        return 0
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
    if only is None:  # a sampled tar is not done: a later run may take more of it
        manifest.write_part(run, "tars", [dict(source=url, images=len(rows), ignored=index.ignored, error=index.error)])
    ok = sum(r["status"] == "ok" for r in fresh)
    report["ok"] += ok
    report["rejected"] += len(fresh) - ok
    extra = [f"{index.ignored} other member(s) ignored"] if index.ignored else []
    if index.filtered:
        extra.append(f"{index.filtered} member(s) outside the sample skipped" if only is not None
                     else f"{index.filtered} above max id {max_id} skipped")
    log.info("ingest: %s: %d ok, %d rejected%s", where, ok, len(fresh) - ok, "".join(f", {e}" for e in extra))
    return len(fresh)


def _take_files(run: Run, unit: Unit, outcome: Any, owner: dict[int, str], report: dict) -> int:
    """Log and write one batch of image files (one part: the rows are the batch's completion)."""
    files = unit[1]
    where = f"{len(files)} image file(s) from {show_url(files[0][0].url)} on"
    if isinstance(outcome, BaseException):
        log.error("ingest: %s: unreadable (%s); no rows written, rerun to retry them", where,
                  first_line(outcome, typed=True))
        report["failed_images"] += len(files)
        return 0
    rows, warnings = outcome
    for line in warnings:
        log.warning("ingest: %s", line)
    fresh = []
    for r in rows:
        first = owner.get(r["image_id"])
        if first is not None:  # another file with the same id: a 62-bit hash collision
            log.warning("ingest: %s: image id %d already ingested from %s; the first is kept", show_url(r["source"]),
                        r["image_id"], show_url(first))
            report["duplicates"] += 1
            continue
        owner[r["image_id"]] = r["source"]
        fresh.append(r)
    manifest.write_part(run, "ingest", fresh)
    ok = sum(r["status"] == "ok" for r in fresh)
    report["ok"] += ok
    report["rejected"] += len(fresh) - ok
    log.info("ingest: %s: %d ok, %d rejected", where, ok, len(fresh) - ok)
    return len(fresh)


def run(
    run_dir: Run,
    sources: list[str],
    *,
    links: str | None = None,
    tars: list[str] | None = None,
    datasets: list[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    max_id: int | None = None,
    limit: int | None = None,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Ingest the tars and image files named by ``sources`` (and/or ``links`` + ``tars``, and the
    train splits of ``datasets``, each ``NAME=PATH``) into ``run``'s manifest.

    ``max_id``: keep ``sa_<id>`` with id ≤ max_id (None: the recipe's; 0: all). ``sample``: keep
    the seeded subset of that many images of all the sources (``ingest_rows.choose_sample``).
    ``limit``: stop after the unit of work that brings this invocation's new rows to at least ``limit``.
    Returns a report: tars, skipped_tars, failed_tars, images, skipped_images, failed_images, ok,
    rejected, duplicates, seconds.
    """
    t0, started = time.perf_counter(), time.time()
    cfg = run_dir.recipe.ingest
    max_id = cfg.max_id if max_id is None else max_id
    options = storage_options if storage_options is not None else run_dir.storage_options
    resolved = resolve_sources(sources, links, tars, options, download_dir=run_dir.url_for("source"))
    urls, found = resolved.urls, list(resolved.images)
    for spec in datasets or []:
        found += dataset_images(*parse_dataset(spec), options)
    if not urls and not found:
        raise SourceError("no SA-1B tars to ingest, nor WebDataset tars or image files"
                          + (f": {'; '.join(resolved.failed)}" if resolved.failed else ""))
    for msg in resolved.failed:  # said here, once: in the error above when nothing is left to ingest
        log.error("ingest: %s; the other sources go on", msg)
    files: dict[int, ImageFile] = {}
    for f in found:  # a file reached through two SOURCEs is one image
        files.setdefault(stable_id(f.url), f)
    existing = manifest.read_manifest(run_dir, "ingest").to_pylist()
    redo = {r["source"] for r in existing if r["status"] == "redo"}  # marked by verify --repair
    done_sources = set(manifest.read_manifest(run_dir, "tars")["source"].to_pylist()) - redo
    owner = {r["image_id"]: r["source"] for r in existing if r["status"] != "redo"}
    report = dict(tars=len(urls), skipped_tars=0, failed_tars=len(resolved.failed), images=len(files),
                  skipped_images=0, failed_images=0, ok=0, rejected=0, duplicates=0)
    only: dict[str, frozenset[int]] = {}
    if sample is not None:
        files, picked = _sample(urls, files, sample, seed, max_id, options, report)
        only = {u: frozenset(ids - owner.keys()) for u, ids in picked.items()}
        todo = [u for u in urls if only.get(u)]
        report["skipped_tars"] = sum(1 for u in picked if not only[u])
    else:
        todo = [u for u in urls if u not in done_sources]
        report["skipped_tars"] = len(urls) - len(todo)
    file_todo = [(f, i) for i, f in sorted(files.items(), key=lambda kv: kv[1].url) if i not in owner]
    report["skipped_images"] = len(files) - len(file_todo)
    units: list[Unit] = [("tar", u, only.get(u)) for u in todo]
    units += [("files", file_todo[k:k + FILE_BATCH]) for k in range(0, len(file_todo), FILE_BATCH)]
    if not units:
        log.info("ingest: nothing to do (%d tar(s), %d image file(s) already ingested)", len(urls), len(files))
        return dict(report, seconds=round(time.perf_counter() - t0, 2))
    workers = max(1, min(cfg.workers, len(units)))
    log.info("ingest: %d tar(s) and %d image file(s) to index and validate (%d tar(s), %d file(s) already done), "
             "%d worker(s)%s", len(todo), len(file_todo), report["skipped_tars"], report["skipped_images"], workers,
             f", SA-1B ids ≤ {max_id}" if max_id else "")
    new = 0
    outcomes = _outcomes(units, workers, (max_id, cfg.max_pixels, options))
    for unit, outcome in outcomes:
        if unit[0] == "tar":
            new += _take_tar(run_dir, unit, outcome, owner, report, max_id)
        else:
            new += _take_files(run_dir, unit, outcome, owner, report)
        if limit and new >= limit:
            log.info("ingest: --limit %d reached after %d new image(s); stopping", limit, new)
            break
    outcomes.close()  # stops the worker pool now, not when garbage-collected
    manifest.compact(run_dir, "ingest")
    manifest.compact(run_dir, "tars")
    manifest.record_invocation(run_dir, "ingest", started, report["ok"], report["rejected"])
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("ingest: done: %(ok)d ok, %(rejected)d rejected, %(duplicates)d duplicate ids, "
             "%(failed_tars)d tar(s) and %(failed_images)d image file(s) failed, "
             "%(skipped_tars)d tar(s) and %(skipped_images)d file(s) skipped, %(seconds).1f s", report)
    return report
