"""The report's scale sweep (Fig. 3 and its tables) from a synthetic Study: seed groups folded into mean ± std,
the share of the sliding teacher's lead each student recovers per scale, and the within-spread marks.

Nothing runs a model: the Study is built from evaluate-like rows and students' settings, as ``load_study``
would return them.
"""

from __future__ import annotations

import csv
import io

import pytest

from spar_pipeline.study import figures, scale_tables, tables
from spar_pipeline.study.inputs import Student, Study

SETTINGS = dict(teacher="default", trainable="blk_-1,blk_-2", images="all", lr=1e-4, epochs=3)
SEEDS = {"default": 0, "default-seed1": 1, "default-seed2": 2}
# scale -> mIoU (one dataset: the mean over datasets is the value itself)
SINGLE = {1.0: 20.0, 2.0: 18.0, 4.0: 15.0}
SLIDING = {8: {1.0: 30.0, 2.0: 30.0}, 16: {4.0: 18.0}, 32: {1.0: 22.0, 2.0: 21.0, 4.0: 16.0}}
STUDENTS = {"default": {1.0: 27.0, 2.0: 30.0, 4.0: 14.0},
            "default-seed1": {1.0: 28.0, 2.0: 31.0, 4.0: 17.0},
            "default-seed2": {1.0: 29.0, 2.0: 32.0, 4.0: 20.0},
            "blk1": {1.0: 25.0, 2.0: 24.0, 4.0: 16.0}}


def _row(model: str, scale: float, miou: float, mode: str = "single", stride: int = 0) -> dict:
    return dict(model=model, mode=mode, stride=stride, scale=scale, dataset="scenes", miou=miou,
                forward_seconds=0.01 * scale * scale * (10 if mode == "sliding" else 1), class_iou=None,
                class_names=None)


def _study(drop: tuple[str, float] | None = None) -> Study:
    rows = [_row("pretrained", s, v) for s, v in SINGLE.items()]
    rows += [_row("pretrained", s, v, "sliding", stride) for stride, by in SLIDING.items() for s, v in by.items()]
    rows += [_row(name, s, v) for name, by in STUDENTS.items() for s, v in by.items() if (name, s) != drop]
    students = [Student(n, {**SETTINGS, "seed": seed}, [], "") for n, seed in SEEDS.items()]
    students.append(Student("blk1", {**SETTINGS, "trainable": "blk_-1", "seed": 0}, [], ""))
    return Study(None, rows, students, {"default": {"stride": 8}})  # type: ignore[arg-type]


def _cells(table: tables.Table, label: str) -> list[str]:
    found = [r for r in table.rows if r[0] == label]
    assert len(found) == 1, f"{label!r} in {[r[0] for r in table.rows]}"
    return found[0]


def test_scale_table_folds_a_seed_group_beside_its_seeds():
    t = scale_tables.scale_table(_study())
    names = [r[0] for r in t.rows]
    assert {"default", "default-seed1", "default-seed2", "blk1"} <= set(names)  # the per-seed rows stay
    folded = _cells(t, "default (3 seeds)")
    assert names.index("default (3 seeds)") == names.index("default-seed2") + 1  # right after its last seed
    assert folded[1] == "single"
    assert folded[2:5] == ["28.00 ± 1.00", "31.00 ± 1.00", "17.00 ± 3.00"]  # sample std over the seeds
    assert not any(r[0].startswith("blk1 (") for r in t.rows)  # one student alone is no group
    assert "(N seeds)" in t.note


def test_scale_table_says_how_many_seeds_a_scale_had():
    folded = _cells(scale_tables.scale_table(_study(drop=("default-seed2", 4.0))), "default (3 seeds)")
    assert folded[4] == "15.50 ± 2.12 (n=2)"  # 14 and 17


def test_gap_recovered_per_scale_by_hand():
    t = scale_tables.gap_table(_study())
    assert t.header == ["row", "@1", "@2", "@4"]
    assert _cells(t, "pretrained single pass")[1:] == ["20.00", "18.00", "15.00"]
    # the teacher's stride 8 was not evaluated at 4x: the finest stride there (16, not 32) stands in, and says so
    assert _cells(t, "sliding teacher s=8")[1:] == ["30.00", "30.00", "18.00 (s=16)"]
    assert _cells(t, "teacher's lead (s=8)")[1:] == ["+10.00", "+12.00", "+3.00"]
    assert "(s=X)" in t.note
    assert _cells(t, "default (3 seeds): single-pass mIoU")[1:] == ["28.00 ± 1.00", "31.00 ± 1.00", "17.00 ± 3.00"]
    # per seed (student - single) / lead: 1x 70, 80, 90 %; 2x 100, 108.33, 116.67 %; 4x -33.3, 66.7, 166.7 %
    rec = _cells(t, "default (3 seeds): gap recovered")[1:]
    assert rec[0] == "80.0 ± 10.0 %"
    assert rec[1] == "108.3 ± 8.3 %"
    assert rec[2] == f"66.7 ± 100.0 % {scale_tables.WITHIN_SPREAD}"  # the lead 3 is no larger than the seeds' std 3
    versus = _cells(t, "default (3 seeds): − sliding teacher")[1:]
    assert versus[0] == "-2.00 ± 1.00"  # below the teacher by more than the spread: no mark
    assert versus[1] == f"+1.00 ± 1.00 surpasses {scale_tables.WITHIN_SPREAD}"
    assert versus[2] == f"-1.00 ± 3.00 {scale_tables.WITHIN_SPREAD}"
    # one student alone: its spread is unknown, and said
    assert _cells(t, "blk1: gap recovered")[1:] == [f"50.0 % {scale_tables.ONE_SEED}", f"50.0 % {scale_tables.ONE_SEED}",
                                                    f"33.3 % {scale_tables.ONE_SEED}"]
    assert _cells(t, "blk1: − sliding teacher")[1] == f"-5.00 {scale_tables.ONE_SEED}"
    assert not any(r[0].startswith("default-seed1") for r in t.rows)  # seeds appear only folded
    assert scale_tables.WITHIN_SPREAD in t.note and scale_tables.ONE_SEED in t.note


def test_gap_recovered_counts_the_seeds_of_each_scale():
    t = scale_tables.gap_table(_study(drop=("default-seed2", 4.0)))
    rec = _cells(t, "default (3 seeds): gap recovered")
    # 4x: 14 and 17 against single 15, lead 3: -33.3 and 66.7 %; the lead 3 > std 2.12: no mark
    assert rec[3] == "16.7 ± 70.7 % (2 of 3 seeds)"


def test_gap_table_needs_two_scales_and_a_student():
    one_scale = _study()
    one_scale.rows = [r for r in one_scale.rows if r["scale"] == 1.0]
    assert scale_tables.gap_table(one_scale) is None
    no_student = _study()
    no_student.rows = [r for r in no_student.rows if r["model"] == "pretrained"]
    no_student.students = []
    assert scale_tables.gap_table(no_student) is None
    no_sliding = _study()
    no_sliding.rows = [r for r in no_sliding.rows if r["mode"] == "single"]
    assert scale_tables.gap_table(no_sliding) is None


def test_the_gap_table_reaches_tables_md_and_csv():
    made = tables.all_tables(_study())
    assert [t.title for t in made][:3] == ["Table 1 shape: models, modes and datasets",
                                           "Fig. 3 data: mean mIoU and forward seconds against evaluation scale",
                                           "Gap recovered against scale"]
    md = tables.to_markdown(made)
    assert "## Gap recovered against scale" in md
    assert f"| default (3 seeds): gap recovered | 80.0 ± 10.0 % | 108.3 ± 8.3 % | 66.7 ± 100.0 % " \
           f"{scale_tables.WITHIN_SPREAD} |" in md
    cells = list(csv.DictReader(io.StringIO(tables.to_csv(made))))
    gap = [c for c in cells if c["table"] == "Gap recovered against scale" and c["column"] == "@4"]
    assert "18.00 (s=16)" in {c["value"] for c in gap}


def test_fig3_draws_a_seed_group_as_one_line_with_a_band():
    study = _study()
    series = figures.scale_series(study)
    labels = [s.label for s in series]
    assert labels == ["pretrained single pass", "pretrained sliding s=8", "pretrained sliding s=32",
                      "default (3 seeds, mean ± std)", "blk1 (single pass)"]  # s=16: one scale, no line
    group = series[3]
    assert group.members == ("default", "default-seed1", "default-seed2")
    assert group.miou == [28.0, 31.0, 17.0]
    assert group.std == pytest.approx([1.0, 1.0, 3.0])
    assert [s.std for s in series if s is not group] == [None] * 4

    fig = figures.scale_figure(study, series)
    left, right = fig.axes
    bands = [c for c in left.collections if (c.get_gid() or "").startswith("band:")]
    assert [b.get_gid() for b in bands] == ["band:default"]  # one band, for the one seed group
    assert not right.collections  # seconds: the mean line only
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(14.0) and ys.max() == pytest.approx(32.0)  # 17 - 3 and 31 + 1
    assert len(left.get_lines()) == len(series) == len(right.get_lines())
    assert not any("seed1" in line.get_label() for line in left.get_lines())

    pic = figures.scale_sweep(study)
    assert pic is not None and pic.png.startswith(b"\x89PNG") and "± the sample std" in pic.caption


def test_no_student_takes_the_sliding_teachers_red():
    col = figures.colours(_study())
    assert len(set(col.values())) == len(col) == 4
    assert "#d62728" not in col.values()  # tab10's red, next to SLIDING_COLOUR
