"""What the study report reads: the evaluate manifest, each student's settings and train manifest,
each teacher's settings. Nothing here runs a model.

Missing pieces are not errors: a run with no students, no evaluate rows, an older evaluate schema
(no ``scale`` or per-class columns) or a student without settings yields a ``Study`` that says what
is missing in ``notes``, so the page can show it instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spar_pipeline import manifest
from spar_pipeline.errors import ManifestError, RunError, first_line
from spar_pipeline.run import Run

__all__ = ["Study", "Student", "load_study", "PRETRAINED"]

PRETRAINED = "pretrained"  # the evaluate manifest's label of the recipe's own weights


@dataclass
class Student:
    """One named training over one teacher: its frozen settings and its per-epoch train rows."""

    name: str
    settings: dict[str, Any]
    curve: list[dict[str, Any]]  # train manifest rows sorted by epoch
    url: str

    @property
    def teacher(self) -> str:
        return str(self.settings.get("teacher", "default"))

    @property
    def best_val_mse(self) -> float | None:
        vals = [r["val_mse"] for r in self.curve if _number(r.get("val_mse"))]
        return min(vals) if vals else None

    @property
    def baseline_val_mse(self) -> float | None:
        vals = [r["baseline_val_mse"] for r in self.curve if _number(r.get("baseline_val_mse"))]
        return vals[-1] if vals else None


@dataclass
class Study:
    """Everything the tables, figures and page are made from."""

    run: Run
    rows: list[dict[str, Any]]  # evaluate rows, normalised (scale, class_iou, class_names always present)
    students: list[Student]
    teachers: dict[str, dict[str, Any]]  # name -> teacher.toml contents
    notes: list[str] = field(default_factory=list)

    def student(self, name: str) -> Student | None:
        return next((s for s in self.students if s.name == name), None)

    def teacher_stride(self, name: str = "default") -> int | None:
        """The sliding stride teacher ``name`` was extracted at: its teacher.toml, else the recipe's."""
        settings = self.teachers.get(name) or {}
        stride = settings.get("stride", (settings.get("extract") or {}).get("stride"))
        if stride is None and name == "default":
            try:
                stride = self.run.recipe.extract.stride
            except Exception:  # noqa: BLE001 - a run without run.toml still gets a page
                return None
        return int(stride) if stride is not None else None


def load_study(run: Run) -> Study:
    """The study of ``run``; a run of the older layout gets its evaluate rows and a note naming the migration."""
    notes: list[str] = []
    rows = _evaluate_rows(run, notes)
    try:
        students = [_student(run, name, notes) for name in run.students()]
        teachers = {name: _settings(run.teacher(name), notes) for name in run.teachers()}
    except RunError as e:
        notes.append(first_line(e, 400))
        students, teachers = [], {}
    if not students:
        notes.append("No students in this run yet: `spar-pipeline train --run R [--student NAME]` makes one.")
    if not rows:
        notes.append("No evaluate rows yet: `spar-pipeline evaluate --run R --dataset NAME=PATH --checkpoint "
                     "pretrained --checkpoint NAME --mode single --mode sliding` adds them.")
    return Study(run, rows, students, teachers, notes)


# ---- helpers -----------------------------------------------------------------------------
def _settings(folder, notes: list[str]) -> dict[str, Any]:
    """A teacher's or student's settings file; {} when it is missing or unreadable (said in ``notes``)."""
    try:
        return folder.settings or {}
    except RunError as e:
        notes.append(f"{first_line(e)}; left out of the grouping.")
        return {}


def _student(run: Run, name: str, notes: list[str]) -> Student:
    folder = run.student(name)
    settings = _settings(folder, notes)
    try:
        curve = sorted(manifest.read_manifest(folder, "train").to_pylist(), key=lambda r: r["epoch"])
    except ManifestError as e:
        notes.append(f"student {name}: train manifest unreadable ({first_line(e)}).")
        curve = []
    return Student(name, settings, curve, folder.url)


def _evaluate_rows(run: Run, notes: list[str]) -> list[dict[str, Any]]:
    try:
        table = manifest.read_manifest(run, "evaluate")
    except ManifestError as e:
        notes.append(f"Evaluate manifest not read: {first_line(e, 300)}")
        return []
    out = []
    for r in table.to_pylist():
        r.setdefault("scale", 1.0)
        r["scale"] = float(r["scale"]) if _number(r["scale"]) else 1.0
        r["stride"] = int(r.get("stride") or 0)
        for col in ("forward_seconds", "predict_seconds", "miou"):
            r[col] = float(r[col]) if _number(r.get(col)) else math.nan
        r.setdefault("class_iou", None)
        r.setdefault("class_names", None)
        out.append(r)
    return _best_is_default(out)


def _best_is_default(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows evaluated as ``--checkpoint best`` are the default student's (``weights.DEFAULT_STUDENT``),
    unless that student has a row of its own for the same key."""
    from spar_pipeline.weights import DEFAULT_STUDENT

    key = lambda r: (r["mode"], r["stride"], r["scale"], r["dataset"])  # noqa: E731
    own = {key(r) for r in rows if r["model"] == DEFAULT_STUDENT}
    for r in rows:
        if r["model"] == "best" and key(r) not in own:
            r["model"] = DEFAULT_STUDENT
    return [r for r in rows if r["model"] != "best"]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
