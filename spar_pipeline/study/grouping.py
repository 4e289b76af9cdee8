"""Which students compare with which: the ablation axes found from their settings alone.

A setting is an axis when its value is not the same for every student. For each axis, students that
agree on every other setting (seed aside) form one ablation; within it, students that differ only in
``seed`` are one configuration, shown as mean ± std. Derived and bookkeeping keys never make an axis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from spar_pipeline.study.inputs import Student

__all__ = ["Ablation", "AXIS_TITLES", "axes", "ablations", "seed_groups", "mean_std", "value_key", "describe"]

SEED = "seed"
NOT_AXES = {"seed", "trainable_params", "name", "fingerprint", "created", "checkpoint_every", "loader_workers"}
# The paper's table each axis reproduces, in the order the report shows them.
AXIS_TITLES = {
    "trainable": "Table 2 shape: trainable parameters",
    "images": "Table 3 shape: training images",
    "teacher": "Table 9 shape: teacher",
}


@dataclass
class Ablation:
    axis: str
    fixed: dict[str, Any]  # the settings of this ablation that are axes elsewhere (its context)
    levels: list[tuple[Any, list[Student]]]  # axis value -> the students (seeds) at it, in axis order

    @property
    def title(self) -> str:
        base = AXIS_TITLES.get(self.axis, f"Ablation: {self.axis}")
        return base + (f" ({describe(self.fixed)})" if self.fixed else "")


def value_key(v: Any) -> str:
    """A hashable, stable form of a setting's value (lists and tables included)."""
    return json.dumps(v, sort_keys=True, default=str)


def axes(students: Sequence[Student]) -> list[str]:
    """Settings whose value differs between students: the known axes first, then the others by name."""
    keys = sorted({k for s in students for k in s.settings} - NOT_AXES)
    differ = [k for k in keys if len({value_key(s.settings.get(k)) for s in students}) > 1]
    return [k for k in AXIS_TITLES if k in differ] + [k for k in differ if k not in AXIS_TITLES]


def ablations(students: Sequence[Student]) -> list[Ablation]:
    """One ``Ablation`` per (axis, group of students agreeing on everything else) with ≥ 2 levels."""
    found = axes(students)
    out = []
    for axis in found:
        others = [k for k in found if k != axis]
        groups: dict[tuple, list[Student]] = {}
        for s in students:
            groups.setdefault(tuple(value_key(s.settings.get(k)) for k in others), []).append(s)
        for members in groups.values():
            levels: dict[str, tuple[Any, list[Student]]] = {}
            for s in members:
                v = s.settings.get(axis)
                levels.setdefault(value_key(v), (v, []))[1].append(s)
            if len(levels) < 2:
                continue
            fixed = {k: members[0].settings.get(k) for k in others}
            order = (lambda lv: _order(lv[1][0].settings.get("trainable_params"))) if axis == "trainable" else (
                lambda lv: _order(lv[0]))  # trainable sets from the fewest parameters up, as Table 2
            out.append(Ablation(axis, fixed, sorted(levels.values(), key=order)))
    return out


def seed_groups(students: Sequence[Student]) -> list[list[Student]]:
    """Students with identical settings apart from the seed, groups of two or more (Tables 5–6)."""
    keys = sorted({k for s in students for k in s.settings} - NOT_AXES)
    groups: dict[tuple, list[Student]] = {}
    for s in students:
        groups.setdefault(tuple(value_key(s.settings.get(k)) for k in keys), []).append(s)
    return [sorted(g, key=lambda s: _order(s.settings.get(SEED))) for g in groups.values() if len(g) > 1]


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample std, n) of the values present; std 0 for one value; None for none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {_show(v)}" for k, v in settings.items())


def _show(v: Any) -> str:
    return "—" if v is None else (v if isinstance(v, str) else value_key(v))


def _order(v: Any) -> tuple:
    """Numbers in numeric order, then "all" (the full split), then other text; None last."""
    if isinstance(v, bool) or v is None:
        return (3, str(v))
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    if v == "all":
        return (1, 0.0, "")
    return (2, 0.0, value_key(v))
