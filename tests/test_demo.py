"""`make demo`'s main job: the mini recipe end to end reproduces the paper's claim in small."""

from __future__ import annotations

from pathlib import Path

from test_cli import cli  # tests/ is on sys.path (pytest's prepend import mode)

from spar_pipeline import manifest
from spar_pipeline.run import Run


def test_mini_demo_spar_beats_single_pass_and_is_faster_than_sliding(tmp_path):
    run = str(tmp_path / "demo")
    out = cli("run", "--run", run, "--recipe", "mini")
    rows = {(r["model"], r["mode"], r["stride"]): r for r in manifest.read_manifest(Run(run), "evaluate").to_pylist()}
    teacher_stride = Run(run).recipe.extract.stride
    single, sliding = rows[("pretrained", "single", 0)], rows[("pretrained", "sliding", teacher_stride)]
    spar = rows[("best", "single", 0)]
    assert all(r["dataset"] == "scenes" and r["images"] > 0 for r in rows.values())
    assert sliding["miou"] > single["miou"]  # the world is resolution-sensitive: sliding helps
    assert spar["miou"] > single["miou"] + 1.0  # SPAR recovers most of it in one pass
    assert spar["forward_seconds"] < sliding["forward_seconds"]
    summary = (Path(run) / "reports" / "summary.md").read_text()
    assert "Open-vocabulary segmentation" in summary and "SPAR student (best)" in summary
    assert "×; float16, codec none)" in summary  # the store line names its format
    assert out.stdout.strip().startswith("# spar-pipeline run summary")

    parts = lambda: len(list((Path(run) / "manifests" / "evaluate").glob("*.parquet")))  # noqa: E731
    before = parts()
    cli("run", "--run", run)  # nothing left: no stage, evaluation included, redoes anything
    assert parts() == before
    cli("run", "--run", run, "--epochs", str(Run(run).recipe.train.epochs + 1))  # a further epoch: new student
    assert parts() > before
    again = {(r["model"], r["mode"], r["stride"]) for r in manifest.read_manifest(Run(run), "evaluate").to_pylist()}
    assert again == set(rows)  # still one row per key: the student's rows replaced, not added
