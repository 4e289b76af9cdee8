"""``report``: the study's tables, figures and page from manifests and settings files.

The manifests are written through the real manifest module, as the stages write them (the evaluate
rows cover whatever columns the current evaluate schema has), and the student settings as
RUN/students/<name>/student.toml files, the run layout's contract.
"""

from __future__ import annotations

import csv
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from spar_pipeline import manifest
from spar_pipeline.run import Run
from spar_pipeline.study import write_report
from spar_pipeline.study.grouping import ablations, mean_std, seed_groups
from spar_pipeline.study.inputs import load_study

BASE = dict(teacher="default", trainable="blk_-1,blk_-2", images="all", seed=0, lr=1e-4, epochs=3,
            images_per_step=1, order="shuffle", trainable_params=16512)
STUDENTS = {  # name -> overrides of BASE
    "default": {},
    "default-seed1": dict(seed=1),
    "default-seed2": dict(seed=2),
    "blk1": dict(trainable="blk_-1", trainable_params=8256),
    "all": dict(trainable="all", trainable_params=120000),
    "img8": dict(images=8),
    "img16": dict(images=16),
    "t4": dict(teacher="s4"),
}
MIOU = {"default": 30.0, "default-seed1": 31.0, "default-seed2": 32.0, "blk1": 27.0, "all": 29.0, "img8": 24.0,
        "img16": 26.0, "t4": 33.0}
DATASETS = ("voc21", "scenes")


def _evaluate_row(**kw) -> dict:
    """A row of the evaluate manifest with exactly the current schema's columns."""
    n = 21 if kw["dataset"] == "voc21" else 21
    full = dict(stride=0, scale=1.0, forward_seconds=0.01, forward_height=64, forward_width=128, predict_seconds=0.02,
                images=4, class_iou=[kw["miou"] + (i % 3) - 1 for i in range(n)], class_names=None)
    full.update(kw)
    names = manifest.schema("evaluate").arrow.names
    return {k: full.get(k) for k in names}


def _has(column: str) -> bool:
    return column in manifest.schema("evaluate").arrow.names


def _rows() -> list[dict]:
    rows = []
    for d, offset in zip(DATASETS, (0.0, 10.0)):
        rows.append(_evaluate_row(model="pretrained", mode="single", dataset=d, miou=20.0 + offset,
                                  forward_seconds=0.01))
        for s, secs in ((8, 0.5), (32, 0.06)):
            rows.append(_evaluate_row(model="pretrained", mode="sliding", stride=s, dataset=d,
                                      miou=(28.0 if s == 8 else 24.0) + offset, forward_seconds=secs))
        for name, m in MIOU.items():
            rows.append(_evaluate_row(model=name, mode="single", dataset=d, miou=m + offset, forward_seconds=0.011))
        if _has("scale"):
            for scale, f in ((0.5, 0.25), (2.0, 4.0)):
                rows.append(_evaluate_row(model="pretrained", mode="single", dataset=d, scale=scale,
                                          miou=18.0 * f ** 0.1 + offset, forward_seconds=0.01 * f))
                rows.append(_evaluate_row(model="pretrained", mode="sliding", stride=8, dataset=d, scale=scale,
                                          miou=27.0 + offset, forward_seconds=0.5 * f))
                rows.append(_evaluate_row(model="default", mode="single", dataset=d, scale=scale,
                                          miou=29.0 + offset, forward_seconds=0.011 * f))
    return rows


def _write_student(run: Run, name: str, settings: dict, val: list[float], baseline: float) -> None:
    run.write_bytes_atomic(tomli_w.dumps(settings).encode(), "students", name, "student.toml")
    manifest.write_part(run.student(name), "train", [dict(epoch=e, step=10 * e, train_loss=v * 1.1, val_mse=v,
                                               baseline_val_mse=baseline, seconds=1.0, data_wait_seconds=0.0,
                                               checkpoint=f"ckpt-{e}") for e, v in enumerate(val)])


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> Run:
    run = Run(str(tmp_path_factory.mktemp("study") / "run"))
    run.resolve_recipe("mini")
    for name, over in STUDENTS.items():
        k = MIOU[name] / 30.0
        _write_student(run, name, {**BASE, **over}, [0.5 / k, 0.3 / k, 0.2 / k], baseline=0.8 if name != "t4" else 0.9)
    run.write_bytes_atomic(tomli_w.dumps(dict(stride=8, window=64)).encode(), "teachers", "default", "teacher.toml")
    run.write_bytes_atomic(tomli_w.dumps(dict(stride=4, window=64)).encode(), "teachers", "s4", "teacher.toml")
    manifest.write_part(run, "evaluate", _rows())
    return run


@pytest.fixture(scope="module")
def report(study_run):
    return write_report(study_run, pictures=False)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]


def _page_links(path: Path) -> list[str]:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.links


def _assert_links_exist(reports: Path) -> list[str]:
    links = _page_links(reports / "index.html")
    files = [x for x in links if not x.startswith("#")]
    for link in files:
        assert not re.match(r"^[a-z]+:|^/", link), f"not a relative link: {link}"
        assert (reports / link).is_file(), f"index.html links {link}, which does not exist"
    return files


def _assert_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.var() > 0, f"{path.name} is blank"


def _section(md: str, title_start: str) -> str:
    parts = md.split("\n## ")
    found = [p for p in parts if p.startswith(title_start)]
    assert found, f"no table titled {title_start!r} in tables.md"
    return found[0]


def test_tables_list_every_student(study_run, report):
    md = Path(study_run.path("reports", "tables.md")).read_text()
    students = _section(md, "Students")
    table1 = _section(md, "Table 1 shape")
    for name in STUDENTS:
        assert f"| {name} |" in students
        assert f"| {name} | single |" in table1
    cells = list(csv.DictReader(io.StringIO(Path(study_run.path("reports", "tables.csv")).read_text())))
    listed = {c["value"] for c in cells if c["table"] == "Students" and c["column"] == "student"}
    assert listed == set(STUDENTS)


def test_table1_gains_over_pretrained_single_and_the_sliding_teacher(study_run, report):
    table1 = _section(Path(study_run.path("reports", "tables.md")).read_text(), "Table 1 shape")
    row = next(line for line in table1.splitlines() if line.startswith("| default | single |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean over voc21 and scenes: 30 and 40 -> 35; pretrained single 25; sliding s=8 (the teacher's stride) 33
    assert cells[2:5] == ["30.00", "40.00", "35.00"]
    assert cells[6] == "+10.00" and cells[7] == "+2.00 (s=8)"
    t4 = next(line for line in table1.splitlines() if line.startswith("| t4 | single |"))
    assert "(s=8)" in t4  # its teacher's stride 4 was never evaluated: the finest evaluated stride


def test_ablations_group_by_what_differs_and_fold_seeds(study_run, report):
    study = load_study(study_run)
    found = {a.axis: a for a in ablations(study.students)}
    assert set(found) == {"trainable", "images", "teacher"}
    levels = {v: [s.name for s in m] for v, m in found["trainable"].levels}
    assert levels == {"blk_-1": ["blk1"], "blk_-1,blk_-2": ["default", "default-seed1", "default-seed2"],
                      "all": ["all"]}
    assert list(levels) == ["blk_-1", "blk_-1,blk_-2", "all"]  # fewest trainable parameters first
    assert [v for v, _ in found["images"].levels] == [8, 16, "all"]
    assert [[s.name for s in g] for g in seed_groups(study.students)] == [["default", "default-seed1",
                                                                           "default-seed2"]]
    md = Path(study_run.path("reports", "tables.md")).read_text()
    t2 = _section(md, "Table 2 shape")
    row = next(line for line in t2.splitlines() if "default, default-seed1, default-seed2" in line)
    assert "16.5 k" in row  # the trainable parameter count
    assert "31.00 ± 1.00" in row and "41.00 ± 1.00" in row  # voc21, scenes: three seeds, sample std
    assert "36.00 ± 1.00" in row  # the mean over datasets
    seeds = _section(md, "Tables 5–6 shape")
    assert "3 seeds" in seeds and "| default-seed2 | 2 |" in seeds
    _section(md, "Table 3 shape")
    _section(md, "Table 9 shape")


def test_mean_std_is_the_sample_std():
    mean, std, n = mean_std([1.0, 2.0, 3.0, None, math.nan])
    assert (mean, n) == (2.0, 3) and math.isclose(std, 1.0)
    assert mean_std([None]) is None and mean_std([4.0]) == (4.0, 0.0, 1)


def test_figures_are_pngs_and_the_page_links_only_files_that_exist(study_run, report):
    reports = Path(study_run.path("reports"))
    names = {Path(f).name for f in report["figures"]}
    expected = {"fig1_speed_accuracy.png", "training_curves.png", "class_gain.png"}
    if _has("scale"):
        expected.add("fig3_scale.png")
    assert expected <= names
    if not _has("class_iou"):
        names.discard("class_gain.png")
    for name in names:
        _assert_png(reports / "figures" / name)
    files = _assert_links_exist(reports)
    assert {f"figures/{n}" for n in names} <= set(files) and "tables.md" in files and "tables.csv" in files


def test_a_run_with_nothing_yet_gets_a_page_saying_so(tmp_path):
    run = Run(str(tmp_path / "empty"))
    run.resolve_recipe("mini")
    out = write_report(run)
    reports = Path(run.path("reports"))
    text = (reports / "index.html").read_text()
    assert "No students in this run yet" in text and "No evaluate rows yet" in text
    assert out["figures"] == []
    _assert_links_exist(reports)


def test_students_without_evaluate_rows_still_listed_with_their_curves(tmp_path):
    run = Run(str(tmp_path / "trained"))
    run.resolve_recipe("mini")
    _write_student(run, "default", dict(BASE), [0.4, 0.3], baseline=0.8)
    _write_student(run, "blk1", {**BASE, "trainable": "blk_-1"}, [0.5, 0.45], baseline=0.8)
    run.write_bytes_atomic(b"teacher = 'default'\n", "students", "bare", "student.toml")  # optional keys missing
    out = write_report(run)
    reports = Path(run.path("reports"))
    md = (reports / "tables.md").read_text()
    for name in ("default", "blk1", "bare"):
        assert f"| {name} |" in _section(md, "Students")
    assert [Path(f).name for f in out["figures"]] == ["training_curves.png"]
    _assert_png(reports / "figures" / "training_curves.png")
    assert "No evaluate rows yet" in (reports / "index.html").read_text()
    _assert_links_exist(reports)


def test_qualitative_pictures_drawn_once_and_again_when_the_student_changes(tmp_path):
    """Fig. 5 and Fig. 7 run the models (mini-clip, a student that differs from it), only when missing."""
    import torch
    from safetensors.torch import save_file

    from spar_pipeline.backbones import build
    from spar_pipeline.mini.scenes import make_scene_benchmark

    from spar_pipeline.resources import stages_dir

    # the mini recipe evaluated small, with a coarse teacher: six windows an image, so the models run quickly
    text = (stages_dir() / "mini.toml").read_text().replace("stride = 12 ", "stride = 32 ")
    text = text.replace("strides = [12, 32]", "strides = [32]")
    (tmp_path / "small.toml").write_text(text)
    run = Run(str(tmp_path / "pics"))
    assert run.resolve_recipe(str(tmp_path / "small.toml")).extract.stride == 32
    bench = {"scenes": str(make_scene_benchmark(tmp_path / "bench", n=3, sizes=((128, 96),)) / "scenes")}
    model = build("mini-clip")
    with torch.no_grad():
        for p in list(model.parameters())[-4:]:
            p.add_(0.05 * torch.randn_like(p))
    weights = Path(run.student("default").best_weights)
    weights.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    _write_student(run, "default", dict(BASE), [0.4, 0.3], baseline=0.8)
    manifest.write_part(run, "evaluate", [
        _evaluate_row(model="pretrained", mode="single", dataset="scenes", miou=20.0),
        _evaluate_row(model="pretrained", mode="sliding", stride=32, dataset="scenes", miou=30.0, forward_seconds=0.2),
        _evaluate_row(model="default", mode="single", dataset="scenes", miou=28.0)])

    out = write_report(run, datasets=bench, images=2)
    reports = Path(run.path("reports"))
    for name in ("fig5_qualitative.png", "fig7_pca.png"):
        assert f"{reports}/figures/{name}" in out["figures"]
        _assert_png(reports / "figures" / name)
    assert {"figures/fig5_qualitative.png", "figures/fig7_pca.png"} <= set(_assert_links_exist(reports))
    kept = (reports / "figures" / "qualitative.json").read_text()
    assert '"default"' in kept and "scene_0000" in kept and "scene_0002" in kept

    stamp = (reports / "figures" / "fig5_qualitative.png").stat().st_mtime_ns
    write_report(run, datasets=bench, images=2)
    assert (reports / "figures" / "fig5_qualitative.png").stat().st_mtime_ns == stamp  # nothing changed: kept
    _write_student(run, "default", dict(BASE), [0.4, 0.3, 0.25], baseline=0.8)  # trained one more epoch
    write_report(run, datasets=bench, images=2)
    assert (reports / "figures" / "fig5_qualitative.png").stat().st_mtime_ns != stamp


def test_rows_evaluated_as_best_are_the_default_students(tmp_path):
    run = Run(str(tmp_path / "best"))
    run.resolve_recipe("mini")
    _write_student(run, "default", dict(BASE), [0.4, 0.3], baseline=0.8)
    manifest.write_part(run, "evaluate", [_evaluate_row(model="pretrained", mode="single", dataset="scenes", miou=20.0),
                                          _evaluate_row(model="best", mode="single", dataset="scenes", miou=27.5)])
    write_report(run, pictures=False)
    md = Path(run.path("reports", "tables.md")).read_text()
    assert "| default | single | 27.50 | 27.50 |" in _section(md, "Table 1 shape")
    assert "| best |" not in md
    row = next(line for line in _section(md, "Students").splitlines() if line.startswith("| default |"))
    assert row.endswith("| 27.50 |")  # its mean mIoU


@pytest.mark.slow
def test_report_of_a_real_tiny_study(tmp_path):
    """The real stages on tiny-cpu: three students (the default, another trainable set, another seed), the
    pretrained model at two scales; the report lists them all, groups them, draws every figure, links what exists.
    (A second teacher's grouping is the synthetic study's: here it would cost one more extract cluster.)"""
    import re as regex

    from spar_pipeline import augment, evaluate, extract, ingest, train
    from spar_pipeline.datasets import make_synthetic
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source
    from spar_pipeline.resources import stages_dir

    text = (stages_dir() / "tiny-cpu.toml").read_text()
    for key, value in dict(epochs="2", holdout_fraction="0.25", checkpoint_every="1000").items():
        text = regex.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    (tmp_path / "tiny.toml").write_text(text)
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(str(tmp_path / "tiny.toml"))
    ingest.run(run, [str(t) for t in make_sa1b_source(tmp_path / "src", n_tars=1, per_tar=8, size=(128, 96), seed=3)])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    train.run(run, progress=False)
    train.run(run, progress=False, student="blk1", trainable="blk_-1")
    train.run(run, progress=False, student="seed1", seed=1)
    bench = {"voc20": str(make_synthetic("voc20", tmp_path / "data", n=2, size=(48, 64)))}
    evaluate.run(run, bench, checkpoints=["pretrained"], modes=("single", "sliding"), strides=[24], scales=(1.0, 0.5))
    evaluate.run(run, bench, checkpoints=["default", "blk1", "seed1"], scales=(1.0, 0.5))

    out = write_report(run, datasets=bench, images=1)
    reports = Path(run.path("reports"))
    md = (reports / "tables.md").read_text()
    for name in ("default", "blk1", "seed1"):
        assert f"| {name} |" in _section(md, "Students") and f"| {name} | single |" in _section(md, "Table 1 shape")
    t2 = _section(md, "Table 2 shape")
    counts = {s: run.student(s).settings["trainable_params"] for s in ("default", "blk1")}
    assert counts["blk1"] < counts["default"]
    assert "blk1" in t2 and "default, seed1" in t2  # the seed folded into the default's row
    assert "2 seeds" in _section(md, "Tables 5–6 shape")
    names = {Path(f).name for f in out["figures"]}
    assert {"fig1_speed_accuracy.png", "fig3_scale.png", "training_curves.png", "class_gain.png",
            "fig5_qualitative.png", "fig7_pca.png"} <= names
    for name in names:
        _assert_png(reports / "figures" / name)
    assert {f"figures/{n}" for n in names} <= set(_assert_links_exist(reports))


def test_a_run_of_the_older_layout_gets_a_page_naming_the_migration(tmp_path):
    run = Run(str(tmp_path / "old"))
    run.resolve_recipe("mini")
    Path(run.path("checkpoints")).mkdir()  # the one-student layout kept its checkpoints at the run's top
    manifest.write_part(run, "evaluate", [_evaluate_row(model="pretrained", mode="single", dataset="scenes",
                                                        miou=20.0)])
    write_report(run, pictures=False)
    reports = Path(run.path("reports"))
    assert "spar-pipeline migrate --run" in (reports / "index.html").read_text()
    assert "| pretrained | single | 20.00 |" in (reports / "tables.md").read_text()
    _assert_links_exist(reports)
