"""Parquet manifests: the completion record and the index of every stage.

Each unit of work appends one part file, written whole-or-nothing, under
``FOLDER/manifests/<stage>/``, where FOLDER is the manifest's owner (a ``run.Folder``): the run for
ingest, augment, evaluate and summary, a teacher (``run.teacher(name)``) for extract, a student
(``run.student(name)``) for train; every function here takes that folder first. Readers merge
all parts in name order (names start with a nanosecond timestamp) and keep the latest row per key,
so a redo or a repair is just a newer row. Schemas live in ``manifests/<stage>.json`` with a version; a part with another
version or other columns is refused, a torn part is quarantined and never counts as done.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spar_pipeline.errors import ManifestError, first_line
from spar_pipeline.fsutil import redact
from spar_pipeline.resources import manifests_dir
from spar_pipeline.run import Folder, Run

__all__ = [
    "ManifestError",
    "Schema",
    "schema",
    "list_stages",
    "write_part",
    "read_manifest",
    "pending",
    "done_ids",
    "compact",
    "record_invocation",
    "DONE",
]

log = logging.getLogger(__name__)

DONE = ("ok", "rejected")  # final statuses; "redo" (written by verify --repair) makes an item pending again
_TYPES = {
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "list<float64>": pa.list_(pa.float64()),  # evaluate's per-class IoU
    "list<string>": pa.list_(pa.string()),
}
_META_STAGE = b"spar.stage"
_META_VERSION = b"spar.schema_version"


@dataclass(frozen=True)
class Schema:
    stage: str
    version: int
    key: tuple[str, ...]
    arrow: pa.Schema

    def table(self, rows: Sequence[dict[str, Any]] | pa.Table) -> pa.Table:
        """Rows (dicts) or a table, cast to this schema; missing columns are an error."""
        if isinstance(rows, pa.Table):
            missing = [n for n in self.arrow.names if n not in rows.column_names]
            if missing:
                raise ManifestError(f"{self.stage} manifest rows lack columns: {', '.join(missing)}")
            table = rows.select(self.arrow.names).cast(self.arrow)
        else:
            for row in rows:
                missing = [n for n in self.arrow.names if n not in row]
                extra = [n for n in row if n not in self.arrow.names]
                if missing or extra:
                    raise ManifestError(
                        f"{self.stage} manifest row: missing {missing or 'none'}, unknown {extra or 'none'}"
                    )
            table = pa.Table.from_pylist(list(rows), schema=self.arrow)
        meta = {_META_STAGE: self.stage.encode(), _META_VERSION: str(self.version).encode()}
        return table.replace_schema_metadata(meta)

    def empty(self) -> pa.Table:
        return self.table([])


def list_stages() -> list[str]:
    return sorted(p.stem for p in manifests_dir().glob("*.json"))


@functools.cache
def schema(stage: str) -> Schema:
    path = manifests_dir() / f"{stage}.json"
    if not path.exists():
        raise ManifestError(f"no manifest schema for stage {stage!r}; known: {', '.join(list_stages())}")
    spec = json.loads(path.read_text())
    fields = [pa.field(c["name"], _TYPES[c["type"]]) for c in spec["columns"]]
    return Schema(spec["stage"], int(spec["version"]), tuple(spec["key"]), pa.schema(fields))


def _stage_dir(run: Folder, stage: str) -> str:
    return run.path("manifests", stage)


def write_part(run: Folder, stage: str, rows: Sequence[dict[str, Any]] | pa.Table,
               name: str | None = None) -> str | None:
    """Append one part atomically; returns its name (None when there were no rows)."""
    table = schema(stage).table(rows)
    if table.num_rows == 0:
        return None
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    name = name or f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    run.write_bytes_atomic(buf.getvalue(), "manifests", stage, name)
    return name


def _part_names(run: Folder, stage: str) -> list[str]:
    directory = _stage_dir(run, stage)
    try:
        run.fs.invalidate_cache(directory)
        entries = run.fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    names = [e.rsplit("/", 1)[-1] for e in entries]
    return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))


def _quarantine(run: Folder, stage: str, name: str, why: str) -> None:
    log.warning("%s/manifests/%s/%s: unreadable part (%s); moved to quarantine/, its rows count as not done",
                redact(run.url), stage, name, why)
    try:
        run.fs.makedirs(run.path("manifests", stage, "quarantine"), exist_ok=True)
        run.fs.mv(run.path("manifests", stage, name), run.path("manifests", stage, "quarantine", name))
    except (FileNotFoundError, OSError):  # another reader moved it first
        pass


def _read_parts(run: Folder, stage: str) -> tuple[list[str], list[pa.Table]]:
    sch = schema(stage)
    names, tables = [], []
    for name in _part_names(run, stage):
        try:
            data = run.read_bytes("manifests", stage, name)
        except FileNotFoundError:  # compacted away between listing and reading
            continue
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as e:
            _quarantine(run, stage, name, first_line(e))
            continue
        meta = table.schema.metadata or {}
        version = meta.get(_META_VERSION, b"?").decode()
        where = f"{redact(run.url)}/manifests/{stage}/{name}"
        if meta.get(_META_STAGE, b"").decode() != stage or version != str(sch.version):
            raise ManifestError(
                f"{where}: schema {meta.get(_META_STAGE, b'?').decode()} v{version}, this spar-pipeline reads "
                f"{stage} v{sch.version}; use the spar-pipeline version that wrote the run"
            )
        if table.schema.names != sch.arrow.names or not table.schema.remove_metadata().equals(sch.arrow):
            raise ManifestError(f"{where}: columns {table.schema.names} do not match the {stage} v{sch.version} schema")
        names.append(name)
        tables.append(table)
    return names, tables


def _latest(table: pa.Table, key: Sequence[str]) -> pa.Table:
    if table.num_rows == 0:
        return table
    indexed = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    last = indexed.group_by(list(key), use_threads=False).aggregate([("__row", "max")])
    keep = pc.sort_indices(last["__row_max"])
    return table.take(pc.take(last["__row_max"], keep))


def read_manifest(run: Folder | str, stage: str) -> pa.Table:
    """All parts merged, the latest row per key; an empty table when nothing is written yet."""
    run = Run(run) if isinstance(run, str) else run
    sch = schema(stage)
    _, tables = _read_parts(run, stage)
    if not tables:
        return sch.empty()
    return _latest(pa.concat_tables([t.replace_schema_metadata(None) for t in tables]), sch.key)


def done_ids(table: pa.Table, key: str = "image_id") -> set:
    """Keys whose latest row is final (ok or rejected)."""
    if table.num_rows == 0:
        return set()
    mask = pc.is_in(table["status"], value_set=pa.array(list(DONE)))
    return set(table.filter(mask)[key].to_pylist())


def pending(input_table: pa.Table, done: pa.Table, key: str = "image_id") -> pa.Table:
    """Rows of the previous stage that are ok there and not final here."""
    if input_table.num_rows == 0:
        return input_table
    ok = input_table.filter(pc.equal(input_table["status"], "ok"))
    finished = done_ids(done, key)
    if not finished:
        return ok
    return ok.filter(pc.invert(pc.is_in(ok[key], value_set=pa.array(sorted(finished), ok.schema.field(key).type))))


def compact(run: Folder, stage: str, min_parts: int = 16) -> int:
    """Merge many small parts into one; returns how many parts were folded.

    The merged part sorts right after the newest part it contains, so the latest-row rule
    is unchanged, and parts written meanwhile by other workers are left alone.
    """
    names, tables = _read_parts(run, stage)
    if len(names) < min_parts:
        return 0
    merged = _latest(pa.concat_tables([t.replace_schema_metadata(None) for t in tables]), schema(stage).key)
    write_part(run, stage, merged, name=names[-1].removesuffix(".parquet") + "~c.parquet")
    for name in names:
        try:
            run.fs.rm(run.path("manifests", stage, name))
        except FileNotFoundError:
            pass
    return len(names)


def record_invocation(run: Folder, stage: str, started: float, done: int, rejected: int = 0, windows: int = 0,
                      workers: dict[str, int] | None = None) -> None:
    """One summary row per stage invocation that did work: what ``status`` shows as throughput.
    ``started`` is the ``time.time()`` the invocation began."""
    import json
    import time
    from datetime import datetime, timezone

    if done + rejected == 0:
        return
    now = time.time()
    seconds = max(now - started, 1e-9)
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    write_part(run, "summary", [dict(
        stage=stage, started=iso(started), finished=iso(now), done=int(done), rejected=int(rejected), seconds=seconds,
        items_per_second=(done + rejected) / seconds, windows_per_second=windows / seconds,
        workers=json.dumps(workers or {}))])
