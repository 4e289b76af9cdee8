"""The study's tables, in the shapes of the paper's: Table 1 (models × modes × datasets with each
student's gain), the ablations (Tables 2, 3, 9 and any other setting that differs), seeds as mean ± std
(Tables 5–6), the scale sweep behind Fig. 3 (``scale_tables``) and every student with its settings.

All mIoU here is at scale 1.0 (the recipe's evaluation size) unless the table is the scale sweep.
Tables are plain data (``Table``) written to ``tables.md`` and, in long form (table, row, column,
value: one line per cell, lossless and easy to pivot), to ``tables.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from spar_pipeline.study.grouping import Ablation, ablations, axes, mean_std, seed_groups
from spar_pipeline.study.inputs import PRETRAINED, Student, Study

__all__ = ["Table", "all_tables", "table1", "ablation_tables", "seed_tables", "students_table", "dataset_order",
           "model_mean", "student_cells", "to_markdown", "to_csv"]

@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    slug: str = field(default="")

    def __post_init__(self) -> None:
        self.slug = self.slug or re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


# ---- selections over the evaluate rows ---------------------------------------------------
def dataset_order(rows: Sequence[dict]) -> list[str]:
    """Datasets present, in the registry's order (the paper's Table 1), then any others by name."""
    from spar_pipeline.datasets import list_datasets

    present = {r["dataset"] for r in rows}
    order = [d for d in list_datasets(include_synthetic=True) if d in present]
    return order + sorted(present - set(order))


def model_cells(rows: Sequence[dict], model: str, mode: str = "single", stride: int = 0,
                scale: float = 1.0) -> dict[str, dict]:
    """dataset -> the evaluate row of (model, mode, stride, scale)."""
    return {r["dataset"]: r for r in rows if r["model"] == model and r["mode"] == mode
            and int(r["stride"]) == int(stride) and math.isclose(r["scale"], scale)}


def model_mean(cells: dict[str, dict], datasets: Sequence[str]) -> float | None:
    """Mean mIoU over ``datasets``; None unless every one of them was evaluated."""
    vals = [cells[d]["miou"] for d in datasets if d in cells and not math.isnan(cells[d]["miou"])]
    return sum(vals) / len(vals) if datasets and len(vals) == len(datasets) else None


def student_cells(study: Study, student: Student) -> dict[str, dict]:
    return model_cells(study.rows, student.name)


def sliding_reference(study: Study, teacher: str = "default") -> int | None:
    """The stride of "the sliding teacher" a student is compared with: its teacher's extract stride when
    the pretrained model was evaluated sliding at it, else the finest stride evaluated."""
    evaluated = sorted({int(r["stride"]) for r in study.rows if r["model"] == PRETRAINED and r["mode"] == "sliding"
                        and math.isclose(r["scale"], 1.0)})
    wanted = study.teacher_stride(teacher)
    if wanted in evaluated:
        return wanted
    return evaluated[0] if evaluated else None


# ---- the tables --------------------------------------------------------------------------
def all_tables(study: Study) -> list[Table]:
    from spar_pipeline.study.scale_tables import gap_table, scale_table  # they build on this module's cells

    tables = [t for t in (table1(study), scale_table(study), gap_table(study)) if t is not None]
    tables += ablation_tables(study) + seed_tables(study)
    if study.students:
        tables.append(students_table(study))
    return tables


def table1(study: Study) -> Table | None:
    rows = [r for r in study.rows if math.isclose(r["scale"], 1.0)]
    if not rows:
        return None
    datasets = dataset_order(rows)
    mean_name = "Mean6" if {"voc21", "voc20", "context60", "context59", "ade20k", "cityscapes"} <= set(datasets) \
        else "Mean"
    single = model_mean(model_cells(rows, PRETRAINED), datasets)
    default_ref = sliding_reference(study)
    header = ["model", "mode", *datasets, mean_name, "forward s", "Δ vs pretrained single",
              "Δ vs sliding teacher"]
    students = {s.name: s for s in study.students}
    known = [PRETRAINED, *students]
    models = known + sorted({r["model"] for r in rows} - set(known))
    body = []
    for model in models:
        plans = sorted({(r["mode"], int(r["stride"])) for r in rows if r["model"] == model},
                       key=lambda p: (p[0] != "single", -p[1]))
        for mode, stride in plans:
            cells = model_cells(rows, model, mode, stride)
            mean = model_mean(cells, datasets)
            fwd = [c["forward_seconds"] for c in cells.values() if not math.isnan(c["forward_seconds"])]
            gain_single = gain_sliding = ""
            if model != PRETRAINED:
                ref = sliding_reference(study, students[model].teacher) if model in students else default_ref
                slide = model_mean(model_cells(rows, PRETRAINED, "sliding", ref), datasets) if ref else None
                gain_single = _delta(mean, single)
                gain_sliding = _delta(mean, slide) + (f" (s={ref})" if slide is not None and mean is not None else "")
            body.append([model, _mode(mode, stride), *(_f(cells[d]["miou"] if d in cells else None) for d in datasets),
                         _f(mean), f"{sum(fwd) / len(fwd):.4g}" if fwd else "", gain_single, gain_sliding])
    missing = [s for s in students if not any(r["model"] == s for r in rows)]
    note = ("mIoU at the recipe's evaluation size (scale 1.0); forward s: the paper's timing of one image "
            "(ViT forward passes only). Δ: difference of the mean mIoU.")
    if missing:
        note += f" Not evaluated yet: {', '.join(missing)}."
    return Table("Table 1 shape: models, modes and datasets", header, body, note)


def ablation_tables(study: Study) -> list[Table]:
    return [_ablation_table(study, a) for a in ablations(study.students)]


def seed_tables(study: Study) -> list[Table]:
    datasets = dataset_order(study.rows)
    out = []
    for group in seed_groups(study.students):
        header = ["student", "seed", *datasets, "Mean", "best val_mse"]
        body = []
        for s in group:
            cells = student_cells(study, s)
            body.append([s.name, str(s.settings.get("seed", "")),
                         *(_f(cells[d]["miou"] if d in cells else None) for d in datasets),
                         _f(model_mean(cells, datasets)), _g(s.best_val_mse)])
        body.append(["mean ± std", f"{len(group)} seeds", *_folded(study, group, datasets)])
        found = [k for k in axes(study.students) if k in group[0].settings]
        context = ", ".join(f"{k} = {group[0].settings[k]}" for k in found) or "the same settings"
        out.append(Table(f"Tables 5–6 shape: seeds of {group[0].name}", header, body,
                         f"{context}; std is the sample standard deviation over the seeds."))
    return out


def students_table(study: Study) -> Table:
    datasets = dataset_order(study.rows)
    keys = [k for k in ("teacher", "trainable", "images", "seed") if any(k in s.settings for s in study.students)]
    keys += [k for k in axes(study.students) if k not in keys]
    header = ["student", *keys, "trainable params", "epochs trained", "best val_mse", "pretrained val_mse",
              "mean mIoU"]
    body = []
    for s in study.students:
        body.append([s.name, *(_cell(s.settings.get(k)) for k in keys), _count(s.settings.get("trainable_params")),
                     str(len({r["epoch"] for r in s.curve})), _g(s.best_val_mse), _g(s.baseline_val_mse),
                     _f(model_mean(student_cells(study, s), datasets))])
    note = "Settings from each student's student.toml; val_mse: held-out MSE against its teacher (lower is closer)."
    return Table("Students", header, body, note)


# ---- writers -----------------------------------------------------------------------------
def to_markdown(tables: Sequence[Table], notes: Sequence[str] = ()) -> str:
    lines = ["# Study tables", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    for t in tables:
        lines += [f"## {t.title}", ""]
        lines.append("| " + " | ".join(t.header) + " |")
        lines.append("|" + "|".join("---" for _ in t.header) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
        lines += ([""] + [t.note] if t.note else []) + [""]
    return "\n".join(lines)


def to_csv(tables: Sequence[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "column", "value"])
    for t in tables:
        for i, row in enumerate(t.rows):
            for col, value in zip(t.header, row):
                w.writerow([t.title, i, col, value])
    return buf.getvalue()


# ---- helpers -----------------------------------------------------------------------------
def _ablation_table(study: Study, ab: Ablation) -> Table:
    datasets = dataset_order(study.rows)
    params = ab.axis == "trainable"
    header = [ab.axis, *(["trainable params"] if params else []), "students", *datasets, "Mean", "best val_mse"]
    body = []
    for value, members in ab.levels:
        head = [_cell(value)]
        if params:
            counts = {m.settings.get("trainable_params") for m in members} - {None}
            head.append(", ".join(_count(c) for c in sorted(counts)))
        body.append([*head, ", ".join(m.name for m in members), *_folded(study, members, datasets)])
    seeds = max(len(m) for _, m in ab.levels)
    note = "Single-pass mIoU of each student at scale 1.0" + (
        "; several students at one level are seeds, shown as mean ± sample std." if seeds > 1 else ".")
    if ab.axis == "teacher":
        note += " Each val_mse is against the student's own teacher, so it compares within a row only."
    return Table(ab.title, header, body, note)


def _folded(study: Study, members: Sequence[Student], datasets: Sequence[str]) -> list[str]:
    """Per dataset, the mean mIoU and the best val_mse over ``members`` as mean ± std (a plain value for one)."""
    cells = [student_cells(study, m) for m in members]
    out = [_pm(mean_std([c[d]["miou"] if d in c else None for c in cells])) for d in datasets]
    out.append(_pm(mean_std([model_mean(c, datasets) for c in cells])))
    out.append(_pm(mean_std([m.best_val_mse for m in members]), fmt="{:.4g}"))
    return out


def _pm(ms: tuple[float, float, int] | None, fmt: str = "{:.2f}") -> str:
    if ms is None:
        return ""
    mean, std, n = ms
    return fmt.format(mean) if n == 1 else f"{fmt.format(mean)} ± {fmt.format(std)}"


def _mode(mode: str, stride: int) -> str:
    return mode if mode == "single" else f"{mode} s={stride}"


def _delta(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{a - b:+.2f}"


def _f(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _g(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _count(v: Any) -> str:
    if v is None:
        return ""
    v = int(v)
    return f"{v / 1e6:.2f} M" if v >= 1e6 else (f"{v / 1e3:.1f} k" if v >= 1e3 else str(v))


def _cell(v: Any) -> str:
    return "" if v is None else str(v)
