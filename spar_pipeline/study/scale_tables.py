"""The report's tables along the resolution axis: the scale sweep behind Fig. 3 (seed groups folded into
mean ± std) and the share of the sliding teacher's lead over the pretrained single pass each student
recovers at every scale, each difference marked when it is no larger than the seeds' spread. Built on
``tables``' selections and cell formats; ``tables.all_tables`` puts them after Table 1.
"""

from __future__ import annotations

import math
from typing import Sequence

from spar_pipeline.study.grouping import mean_std, seed_groups
from spar_pipeline.study.inputs import PRETRAINED, Student, Study
from spar_pipeline.study.tables import Table, _f, _mode, _pm, dataset_order, model_cells, model_mean, sliding_reference

__all__ = ["scale_table", "gap_table", "WITHIN_SPREAD", "ONE_SEED"]

WITHIN_SPREAD = "(within spread)"  # a difference no larger than the students' seed std: not a supported claim
ONE_SEED = "(one seed)"  # no seed group: the spread is unknown


def scale_table(study: Study) -> Table | None:
    scales = sorted({r["scale"] for r in study.rows})
    if len(scales) < 2:
        return None
    datasets = dataset_order(study.rows)
    header = ["model", "mode", *(f"mIoU @{s:g}" for s in scales), *(f"forward s @{s:g}" for s in scales)]
    plans = _plans(study.rows)
    groups = seed_groups(study.students)
    after: dict[int, list[list[Student]]] = {}  # a seed group's folded row follows its last member's row
    for g in groups:
        names = {m.name for m in g}
        at = [i for i, (model, mode, _) in enumerate(plans) if mode == "single" and model in names]
        if at:
            after.setdefault(max(at), []).append(g)
    body = []
    for i, (model, mode, stride) in enumerate(plans):
        means, secs = [], []
        for s in scales:
            cells = model_cells(study.rows, model, mode, stride, s)
            means.append(_f(model_mean(cells, datasets)))
            secs.append(_secs(cells.values()))
        body.append([model, _mode(mode, stride), *means, *secs])
        for g in after.get(i, []):
            body.append(_folded_scale_row(study, g, scales, datasets))
    note = f"Mean mIoU over {', '.join(datasets)}; scale 1.0 is the recipe's evaluation size."
    if after:
        note += (" A row \"NAME (N seeds)\" folds a seed group (students alike but for the seed): mean ± sample std "
                 "over its seeds, with (n=K) where only K of them were evaluated at that scale.")
    return Table("Fig. 3 data: mean mIoU and forward seconds against evaluation scale", header, body, note)


def gap_table(study: Study) -> Table | None:
    """Per scale, the sliding teacher's lead over the pretrained single pass and the share of it each student
    (seed groups folded) recovers in one pass; None without both pretrained modes at two scales and a student."""
    rows, datasets = study.rows, dataset_order(study.rows)
    scales = sorted({r["scale"] for r in rows})
    single = {s: v for s in scales if (v := _mean(rows, PRETRAINED, "single", 0, s, datasets)) is not None}
    strides = {s: [t for t in sorted({int(r["stride"]) for r in rows if r["model"] == PRETRAINED
                                       and r["mode"] == "sliding" and math.isclose(r["scale"], s)})
                   if _mean(rows, PRETRAINED, "sliding", t, s, datasets) is not None] for s in single}
    scales = [s for s in single if strides[s]]
    units = [(u, ref) for u, ref in _units(study) if any(_unit_values(rows, u[1], s, datasets) for s in scales)]
    if len(scales) < 2 or not units:
        return None

    def teacher(ref: int | None, s: float) -> tuple[int, float]:
        used = ref if ref in strides[s] else strides[s][0]
        return used, _mean(rows, PRETRAINED, "sliding", used, s, datasets)

    header = ["row", *(f"@{s:g}" for s in scales)]
    body = [["pretrained single pass", *(_f(single[s]) for s in scales)]]
    fell_back = False
    for ref in dict.fromkeys(ref for _, ref in units):
        slide, lead_cells = [], []
        for s in scales:
            used, value = teacher(ref, s)
            fell_back |= used != ref
            slide.append(_f(value) + ("" if used == ref else f" (s={used})"))
            lead_cells.append(f"{value - single[s]:+.2f}")
        name = f"s={ref}" if ref is not None else "finest stride"
        body += [[f"sliding teacher {name}", *slide], [f"teacher's lead ({name})", *lead_cells]]
        for label, members in [u for u, r in units if r == ref]:
            miou, recovered, versus = [], [], []
            for s in scales:
                vals = _unit_values(rows, members, s, datasets)
                ms = mean_std(vals)
                if ms is None:
                    for cells in (miou, recovered, versus):
                        cells.append("")
                    continue
                seeds = "" if ms[2] == len(members) or ms[2] == 1 else f" ({ms[2]} of {len(members)} seeds)"
                miou.append(_pm(ms) + seeds)
                top = teacher(ref, s)[1]
                recovered.append(_recovered(vals, single[s], top) + seeds)
                versus.append(_versus(vals, top) + seeds)
            body += [[f"{label}: single-pass mIoU", *miou], [f"{label}: gap recovered", *recovered],
                     [f"{label}: − sliding teacher", *versus]]
    note = (f"Mean mIoU over {', '.join(datasets)}. The teacher's lead = the pretrained sliding teacher (at its "
            "extract stride, as in Table 1) − the pretrained single pass; gap recovered = (student − pretrained "
            "single) / lead, in %, per seed then mean ± sample std over a seed group's seeds. "
            f"{WITHIN_SPREAD}: the difference the cell rests on (the teacher's lead for gap recovered, student − "
            "teacher for − sliding teacher) is no larger than the students' seed std, so these seeds do not "
            f"support the claim. {ONE_SEED}: a single student, its spread unknown. surpasses: the student's mean "
            "is above the sliding teacher. The pretrained rows are one deterministic evaluation each.")
    if fell_back:
        note += (" A sliding cell marked (s=X): the teacher's stride was not evaluated at that scale; X, the "
                 "finest stride evaluated there, stands in for it (its lead and the students' cells of that scale "
                 "use it).")
    return Table("Gap recovered against scale", header, body, note)


def _folded_scale_row(study: Study, group: Sequence[Student], scales: Sequence[float],
                      datasets: Sequence[str]) -> list[str]:
    """The scale table's row of a seed group: mean ± std of the members' mean mIoU and their mean seconds."""
    means, secs = [], []
    for s in scales:
        cells = [model_cells(study.rows, m.name, "single", 0, s) for m in group]
        ms = mean_std([model_mean(c, datasets) for c in cells])
        means.append(_pm(ms) + (f" (n={ms[2]})" if ms is not None and ms[2] < len(group) else ""))
        secs.append(_secs([row for c in cells for row in c.values()]))
    return [f"{group[0].name} ({len(group)} seeds)", "single", *means, *secs]


def _units(study: Study) -> list[tuple[tuple[str, list[str]], int | None]]:
    """((label, member model names), sliding reference stride) of every student, seed groups folded into one;
    models evaluated without a student folder compare with the default teacher."""
    groups = {g[0].name: g for g in seed_groups(study.students)}
    grouped = {m.name for g in groups.values() for m in g}
    out = []
    for s in study.students:
        ref = sliding_reference(study, s.teacher) or study.teacher_stride(s.teacher)
        if s.name in groups:
            g = groups[s.name]
            out.append(((f"{s.name} ({len(g)} seeds)", [m.name for m in g]), ref))
        elif s.name not in grouped:
            out.append(((s.name, [s.name]), ref))
    known = {s.name for s in study.students} | {PRETRAINED}
    default_ref = sliding_reference(study) or study.teacher_stride()
    out += [((m, [m]), default_ref) for m in sorted({r["model"] for r in study.rows} - known)]
    return out


def _unit_values(rows: Sequence[dict], members: Sequence[str], scale: float,
                 datasets: Sequence[str]) -> list[float]:
    """The single-pass mean mIoU of each member evaluated at ``scale``."""
    vals = [_mean(rows, m, "single", 0, scale, datasets) for m in members]
    return [v for v in vals if v is not None]


def _recovered(vals: Sequence[float], single: float, teacher: float) -> str:
    lead = teacher - single
    if lead <= 0:
        return "no lead to recover"
    ms = mean_std([100.0 * (v - single) / lead for v in vals])
    if ms[2] == 1:
        return f"{ms[0]:.1f} % {ONE_SEED}"
    text = f"{ms[0]:.1f} ± {ms[1]:.1f} %"
    return text + (f" {WITHIN_SPREAD}" if lead <= mean_std(vals)[1] else "")


def _versus(vals: Sequence[float], teacher: float) -> str:
    ms = mean_std([v - teacher for v in vals])
    mean, std, n = ms
    text = f"{mean:+.2f}" + (f" ± {std:.2f}" if n > 1 else "") + (" surpasses" if mean > 0 else "")
    if n == 1:
        return f"{text} {ONE_SEED}"
    return text + (f" {WITHIN_SPREAD}" if abs(mean) <= std else "")


def _mean(rows: Sequence[dict], model: str, mode: str, stride: int, scale: float,
          datasets: Sequence[str]) -> float | None:
    return model_mean(model_cells(rows, model, mode, stride, scale), datasets)


def _secs(cells) -> str:
    fwd = [c["forward_seconds"] for c in cells if not math.isnan(c["forward_seconds"])]
    return f"{sum(fwd) / len(fwd):.4g}" if fwd else ""


def _plans(rows: Sequence[dict]) -> list[tuple[str, str, int]]:
    seen = dict.fromkeys((r["model"], r["mode"], int(r["stride"])) for r in rows)
    return sorted(seen, key=lambda p: (p[0] != PRETRAINED, p[0], p[1] != "single", -p[2]))
