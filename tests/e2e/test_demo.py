"""`make demo`'s main job: the mini recipe end to end reproduces the paper's claim in small."""

from __future__ import annotations

from pathlib import Path

import pytest

from _cli import cli  # tests/ is on sys.path (tests/conftest.py)

from spar_pipeline import manifest
from spar_pipeline.run import Run


@pytest.mark.timeout(2000)  # measured 223 s alone on 2 idle cores, 527–653 s beside the other xdist worker;
# > 1100 s with a study running too (2026-12-03): the limits catch a hang, they do not time the demo
def test_mini_demo_spar_beats_single_pass_and_reports_forward_times(tmp_path):
    # torch's own thread count (one thread per process: 416 s alone, against 223 s). That a further epoch makes a
    # new student whose rows replace its old ones is checked on the tiny run (tests/e2e/test_cli_student.py), not
    # here: it cost 68 s more of the mini world
    run = str(tmp_path / "demo")
    out = cli("run", "--run", run, "--recipe", "mini", timeout=1900)  # the test's own limit, not the helper's 600 s
    every = manifest.read_manifest(Run(run), "evaluate").to_pylist()
    rows = {(r["model"], r["mode"], r["stride"]): r for r in every if r["scale"] == 1.0}
    teacher_stride = Run(run).recipe.extract.stride
    scales = Run(run).recipe.evaluate.scales
    assert len(scales) >= 3 and {1.0, 2.0} <= set(scales)  # Fig. 3's axis: pretrained and student single at each, sliding at scale_strides
    for model in ("pretrained", "best"):
        assert {r["scale"] for r in every if r["model"] == model and r["mode"] == "single"} == set(scales)
    for stride in Run(run).recipe.evaluate.scale_strides:
        assert {r["scale"] for r in every if r["mode"] == "sliding" and r["stride"] == stride} == set(scales)
    single, sliding = rows[("pretrained", "single", 0)], rows[("pretrained", "sliding", teacher_stride)]
    spar = rows[("best", "single", 0)]
    assert all(r["dataset"] == "scenes" and r["images"] > 0 for r in rows.values())
    at = lambda scale: {(r["model"], r["mode"], r["stride"]): r["miou"] for r in every if r["scale"] == scale}  # noqa: E731
    # the world is resolution-sensitive: at the largest scale the sliding teacher leads the single pass
    # (measured: s=32 +17.2 mIoU at 4×, s=12 +4.3 at 1×), and at 2× the student, in one pass, beats the single
    # pass it starts from (measured: +7.4; +5.1 at 4×, but −2.1 at 1×: README "The miniature world")
    top, mid = at(max(scales)), at(2.0)
    assert top[("pretrained", "sliding", min(Run(run).recipe.evaluate.scale_strides))] > top[("pretrained", "single", 0)] + 2.0
    assert mid[("best", "single", 0)] > mid[("pretrained", "single", 0)] + 1.0, mid
    # speed is measured, not asserted (one timed pass on a shared CPU flips the order: 0.348 s single vs
    # 0.032 s sliding seen under load); what the rows must say is that each pass was timed, at the recipe's size
    size = list(Run(run).recipe.evaluate.timing_size)
    for r in (single, sliding, spar):
        assert r["forward_seconds"] > 0 and [r["forward_height"], r["forward_width"]] == size
    summary = (Path(run) / "reports" / "summary.md").read_text()
    assert "Open-vocabulary segmentation" in summary and "SPAR student (best)" in summary
    assert "×; float16, codec none)" in summary  # the store line names its format
    assert out.stdout.strip().startswith("# spar-pipeline run summary")
    index = Path(run) / "reports" / "index.html"  # the study report, named by the summary
    assert f"`{index}`" in summary and index.is_file()
    assert (Path(run) / "reports" / "figures" / "fig3_scale.png").is_file()
    assert "summary.md" in index.read_text()  # the page links the summary, written before it

    parts = lambda: len(list((Path(run) / "manifests" / "evaluate").glob("*.parquet")))  # noqa: E731
    before = parts()
    cli("run", "--run", run)  # nothing left: no stage, evaluation included, redoes anything
    assert parts() == before


def test_mini_paper_recipe_expands_into_the_papers_studies(tmp_path):
    """stages/mini-paper.toml, loaded (no training): Table 2's eight trainable sets, Table 3's nested sizes,
    three seeds of the default, an s = K/4 teacher beside the default, and Fig. 1/3's strides and scales."""
    from spar_pipeline.backbones import build
    from spar_pipeline.recipe import load_recipe

    recipe = load_recipe("mini-paper")
    assert recipe.recipe.backbone == "mini-clip"
    window = recipe.extract.window
    assert [(t.name, t.extract) for t in recipe.teachers] == [("s16", {"stride": window // 4})]
    students = {s.name: s for s in recipe.students}
    assert len(students) == 14
    default = students["default"]
    assert (default.teacher, default.images, default.seed, default.train) == ("default", None, None, {})

    def only(s, **what) -> bool:  # s differs from the default student in exactly these settings
        got = {"teacher": s.teacher, "images": s.images, "seed": s.seed, **s.train}
        base = {"teacher": "default", "images": None, "seed": None}
        return {k: v for k, v in got.items() if base.get(k, object()) != v} == what

    seeds = sorted(s.seed for s in students.values() if only(s, seed=s.seed))
    assert seeds == [1, 2] and recipe.recipe.seed == 0  # with the default's (the recipe's seed 0): three
    assert sorted(s.images for s in students.values() if only(s, images=s.images)) == [8, 16, 32]
    assert [n for n, s in students.items() if only(s, teacher="s16")] == ["teacher-s16"]
    specs = [recipe.train.trainable] + [s.train["trainable"] for s in students.values()
                                        if only(s, trainable=s.train.get("trainable"))]
    assert len(specs) == 8 == len(set(specs))
    model = build("mini-clip")
    unfrozen = set()
    for spec in specs:  # each set unfreezes something on mini-clip, and a different set of parameters
        assert model.set_trainable(spec) > 0, spec
        unfrozen.add(frozenset(n for n, p in model.named_parameters() if p.requires_grad))
    assert len(unfrozen) == 8
    assert len(recipe.evaluate.scales) >= 3 and 1.0 in recipe.evaluate.scales  # Fig. 3
    assert len(recipe.evaluate.strides) >= 3 and recipe.extract.stride in recipe.evaluate.strides  # Fig. 1
    run = Run(str(tmp_path / "study"))
    frozen = run.resolve_recipe("mini-paper")  # the run keeps the lists, seeds expanded
    assert [s.name for s in Run(str(tmp_path / "study")).recipe.students] == list(students) == [
        s.name for s in frozen.students]
