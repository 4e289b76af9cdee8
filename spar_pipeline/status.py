"""``spar-pipeline status``: what each stage planned, finished and still owes, from manifests only."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from spar_pipeline.manifest import read_manifest
from spar_pipeline.run import Run

__all__ = ["stage_status", "print_status"]

_CHAIN = (("ingest", None), ("augment", "ingest"), ("extract", "augment"))


def _count(table: pa.Table, status: str) -> int:
    if table.num_rows == 0:
        return 0
    return int(pc.sum(pc.equal(table["status"], status)).as_py() or 0)


def _bytes(stage: str, table: pa.Table) -> int:
    ok = table.filter(pc.equal(table["status"], "ok")) if table.num_rows else table
    if ok.num_rows == 0:
        return 0
    if stage == "ingest":
        return int(pc.sum(ok["size"]).as_py())
    if stage == "extract":  # raw float16 bytes of the stored maps
        return int(pc.sum(pc.multiply(pc.multiply(ok["grid_h"].cast(pa.int64()), ok["grid_w"]), ok["dim"])).as_py()) * 2
    return 0


def stage_status(run: Run) -> list[dict[str, Any]]:
    """One row per stage; ``extract NAME`` per teacher and ``train NAME`` per student besides the defaults."""
    chain = [(stage, stage, previous, read_manifest(run, stage)) for stage, previous in _CHAIN if stage != "extract"]
    chain += [("extract" if name == "default" else f"extract {name}", "extract", "augment",
               read_manifest(run.teacher(name), "extract")) for name in run.teachers() or ["default"]]
    tables = {stage: t for label, stage, _, t in chain if label == stage}
    summary = read_manifest(run, "summary").to_pylist()
    out = []
    for label, stage, previous, t in chain:
        done, rejected = _count(t, "ok"), _count(t, "rejected")
        planned = _count(tables[previous], "ok") if previous else t.num_rows
        last = [s for s in summary if s["stage"] == label]
        out.append(
            dict(
                stage=label,
                planned=planned,
                done=done,
                rejected=rejected,
                pending=max(planned - done - rejected, 0),
                bytes=_bytes(stage, t),
                items_per_second=last[-1]["items_per_second"] if last else None,
                windows_per_second=last[-1]["windows_per_second"] if last else None,
            )
        )
    for name in run.students():
        student = run.student(name)
        train, epochs = read_manifest(student, "train"), (student.settings or {}).get("epochs", run.recipe.train.epochs)
        if not train.num_rows:
            continue
        label = "train" if name == "default" else f"train {name}"
        last = [s for s in summary if s["stage"] == label]  # planned/done in epochs; throughput in steps/s
        out.append(dict(stage=label, planned=epochs, done=train.num_rows,
                        rejected=0, pending=max(epochs - train.num_rows, 0), bytes=0,
                        items_per_second=last[-1]["items_per_second"] if last else None, windows_per_second=None))
    evaluated = read_manifest(run, "evaluate")
    if evaluated.num_rows:  # one row per (model, mode, stride, dataset)
        out.append(dict(stage="evaluate", planned=evaluated.num_rows, done=evaluated.num_rows, rejected=0,
                        pending=0, bytes=0, items_per_second=None, windows_per_second=None))
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def print_status(run: Run, console: Console) -> None:
    table = Table(title=f"{run.url}  (recipe {run.recipe.name})",
                  caption="train counts epochs (items/s: steps/s); evaluate counts result rows")
    for col in ("stage", "planned", "done", "rejected", "pending", "bytes", "items/s", "windows/s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in stage_status(run):
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        table.add_row(row["stage"], str(row["planned"]), str(row["done"]), str(row["rejected"]), str(row["pending"]),
                      _human(row["bytes"]), fmt(row["items_per_second"]), fmt(row["windows_per_second"] or None))
    console.print(table)
