"""The segmentation head and the evaluate stage: single and sliding, end to end on tiny-siglip."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spar_pipeline import evaluate, heldout, segment, timing
from spar_pipeline.datasets import make_synthetic
from spar_pipeline.manifest import read_manifest
from spar_pipeline.recipe import DatasetEval, load_recipe
from spar_pipeline.run import Run

from _evaluate_fakes import Clock, CountingWindows, OneHot, striped_voc  # tests/ is on sys.path (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny():
    from spar_pipeline.backbones import build

    return build("tiny-siglip")


def test_resize_keep_ratio_mmcv_rule():
    assert segment.resize_keep_ratio(375, 500, (2048, 672)) == (672, 896)  # VOC 500×375 -> 896×672
    assert segment.resize_keep_ratio(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert segment.resize_keep_ratio(500, 3000, (2048, 672)) == (341, 2048)  # long side capped
    img = np.zeros((375, 500, 3), np.uint8)
    assert segment.resize_image(img, (2048, 672)).shape == (672, 896, 3)


def test_postprocess_synonyms_and_thresholds():
    # 3 queries -> 2 classes: class 0 has synonyms 0 and 1, class 1 is query 2
    index = torch.tensor([0, 0, 1])
    cos = torch.zeros(3, 1, 4)
    cos[1, 0, 0] = 1.0  # synonym 1 of class 0 wins pixel 0
    cos[2, 0, 1:] = 1.0  # class 1 wins pixels 1..3
    pred = segment.postprocess(cos, index, DatasetEval(logit_scale=10.0))
    assert pred.tolist() == [[0, 1, 1, 1]]
    # prob_thd: uniform logits -> max class probability 2/3 (class 0's synonym max is 1/3)
    flat = segment.postprocess(torch.zeros(3, 1, 2), index, DatasetEval(logit_scale=1.0, prob_thd=0.5))
    assert flat.tolist() == [[0, 0]]
    # area_thd: class 2 covers 1 of 4 non-background pixels (25% ≤ 30%) and is suppressed
    cos = torch.zeros(3, 1, 5)
    cos[0, 0, 0] = 1.0
    cos[1, 0, 1:4] = 1.0
    cos[2, 0, 4] = 1.0
    cos[1, 0, 4] = 0.5  # second choice of the suppressed pixel
    pred = segment.postprocess(cos, torch.arange(3), DatasetEval(logit_scale=10.0, area_thd=0.3))
    assert pred.tolist() == [[0, 1, 1, 1, 1]]


def test_sliding_one_window_equals_single(tiny):
    x = torch.randn(1, 3, 64, 64)
    emb = F.normalize(torch.randn(5, tiny.dim), dim=-1)
    single = segment.single_logits(tiny, x, emb, (64, 64))
    for stride in (24, 256):
        torch.testing.assert_close(segment.sliding_logits(tiny, x, emb, (64, 64), stride), single)


@pytest.mark.parametrize("hw", [(84, 126), (40, 50), (90, 64)])  # resized sides ≤ 2K: stride 256 still covers
def test_predict_shapes_any_size(tiny, hw):
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3)).astype(np.uint8)
    text = (F.normalize(torch.randn(4, tiny.dim), dim=-1), torch.tensor([0, 0, 1, 2]))
    cfg = DatasetEval(logit_scale=40.0)
    for mode, stride, scale in [("single", None, (256, 84)), ("sliding", 24, None), ("sliding", 256, (256, 84)),
                                ("sliding", 24, (256, 84))]:
        pred = segment.predict(tiny, image, text, cfg, scale, mode, stride, window_batch=3)
        assert pred.shape == hw and pred.dtype == np.int64 and pred.min() >= 0 and pred.max() <= 2


def test_perfect_predictor_scores_100_in_every_mode(tmp_path):
    root = striped_voc(tmp_path)
    recipe = load_recipe("tiny-cpu")
    recipe = dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, resize=(96, 64),
                                                                       timing_warmup=3))
    model = OneHot()
    rows = evaluate.run(None, {"voc21": str(root)}, modes=("single", "sliding"), strides=[16, 256],
                        backbone=model, recipe=recipe, timing_size=(96, 192))
    assert [(r["mode"], r["stride"]) for r in rows] == [("single", 0), ("sliding", 16), ("sliding", 256)]
    for r in rows:
        assert r["miou"] == pytest.approx(100.0) and r["images"] == 3 and r["forward_seconds"] > 0
    model.calls = 0
    timing.forward_time(model, "single", size=(64, 96), warmup=3, fresh=True)
    assert model.calls == 4  # 3 warm-up passes, the 4th timed


def test_evaluate_end_to_end_tiny_siglip(tmp_path, tiny):
    from safetensors.torch import save_file

    data = tmp_path / "data"
    make_synthetic("voc20", data, n=2, size=(48, 64))  # resized to 84×112
    make_synthetic("cityscapes", data, n=2, size=(48, 48))  # resized to 128×128 (≤ 2K: stride 256 covers it)
    run = Run(str(tmp_path / "run"))
    recipe = load_recipe("tiny-cpu")
    run.resolve_recipe(dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, timing_warmup=0)))
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    first = next(k for k in state if k.endswith("weight") and "trunk.blocks" in k)
    state[first] += 0.5  # a "student" that differs from the pretrained weights
    from spar_pipeline.weights import BEST

    Path(run.path(*BEST)).parent.mkdir(parents=True)  # the default student's best epoch
    save_file(state, run.path(*BEST))

    datasets = {"voc20": str(data), "cityscapes": str(data / "cityscapes")}
    rows = evaluate.run(run, datasets, checkpoints=["pretrained", "best"], modes=("single", "sliding"),
                        strides=[24, 256], timing_size=(128, 256))
    assert len(rows) == 2 * 3 * 2
    assert {(r["model"], r["mode"], r["stride"]) for r in rows} == {
        (m, mode, s) for m in ("pretrained", "best") for mode, s in (("single", 0), ("sliding", 24), ("sliding", 256))}
    assert all(0 <= r["miou"] <= 100 and r["images"] == 2 and r["forward_seconds"] > 0 for r in rows)
    table = read_manifest(run, "evaluate")
    assert table.num_rows == 12

    md = (tmp_path / "run" / "reports" / "table.md").read_text().splitlines()
    assert md[0] == "| model | mode | voc20 | cityscapes | Mean | forward s @128×256 | predict s/img |"
    assert any(line.startswith("| best | sliding s=24 |") for line in md) and len(md) == 2 + 6
    with open(tmp_path / "run" / "reports" / "table.csv") as f:
        body = list(csv.reader(f))
    assert body[0][-3] == "Mean" and len(body) == 7
    for line in body[1:]:
        assert float(line[-3]) == pytest.approx((float(line[2]) + float(line[3])) / 2, abs=0.01)

    again = evaluate.run(run, datasets, checkpoints=["pretrained"], modes=("single",))  # already done: no work
    assert [r["miou"] for r in again] == [r["miou"] for r in rows if r["model"] == "pretrained" and r["stride"] == 0]
    assert read_manifest(run, "evaluate").num_rows == 12


def test_table_mean6_and_missing_cells():
    speed = {"forward_seconds": 0.5, "forward_height": 1024, "forward_width": 2048, "predict_seconds": 0.7}
    rows = [{"model": "m", "mode": "single", "stride": 0, "dataset": d, "miou": float(i), **speed,
             "images": 1} for i, d in enumerate(["voc21", "voc20", "context60", "context59", "ade20k", "cityscapes"])]
    rows.append({"model": "s", "mode": "sliding", "stride": 24, "dataset": "voc21", "miou": 1.0,
                 **speed, "forward_seconds": math.nan, "images": 1})
    header, body = evaluate.table_rows(rows)
    assert header[-3] == "Mean6" and header[-2:] == ["forward s @1024×2048", "predict s/img"]
    assert body[0][-3] == "2.50" and body[1][1] == "sliding s=24" and body[1][-3] == "" and body[1][-2] == ""
    assert body[0][-2:] == ["0.5000", "0.7000"] and body[1][-1] == "0.7000"


def test_sliding_gaps_are_refused(tiny):
    emb = F.normalize(torch.randn(2, tiny.dim), dim=-1)
    with pytest.raises(ValueError, match="stride 256 > window 64 leaves pixels of the width"):
        segment.sliding_logits(tiny, torch.zeros(1, 3, 64, 200), emb, (64, 200), 256)


def test_errors_say_what_to_pass(tmp_path):
    recipe = load_recipe("tiny-cpu")
    with pytest.raises(evaluate.EvaluateError, match="--run RUN or --recipe"):
        evaluate.run(None, {"voc21": str(tmp_path)})
    with pytest.raises(evaluate.EvaluateError, match="choose from single, sliding"):
        evaluate.run(None, {"voc21": str(tmp_path)}, modes=("fast",), recipe=recipe)
    with pytest.raises(evaluate.EvaluateError, match="needs --run"):
        evaluate.resolve_checkpoint(None, "best")


def test_feature_mse_against_the_store(tmp_path, tiny):
    from spar_pipeline import augment, augmentation, ingest
    from spar_pipeline.store import FeatureStore
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source
    from spar_pipeline.windows import sliding_features

    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    ingest.run(run, [str(t) for t in make_sa1b_source(tmp_path / "src", n_tars=1, per_tar=2, seed=1)])
    augment.run(run)
    ids = read_manifest(run, "augment")["image_id"].to_pylist()
    store = FeatureStore.create(run.store_url, {"teacher": "test"})
    want = []
    for i in ids:  # the teacher written by hand (the extract stage's own tests cover extract)
        img = augmentation.augmented_image(run, i).float()[None] / 255.0
        x = (img - torch.tensor(tiny.mean).view(1, 3, 1, 1)) / torch.tensor(tiny.std).view(1, 3, 1, 1)
        with torch.no_grad():
            teacher = sliding_features(tiny, x, window=64, stride=24).numpy().astype(np.float16)
            store.write(i, teacher)
            want.append(float(((tiny.dense(x)[0] - torch.from_numpy(teacher.astype(np.float32))) ** 2).mean()))
    mse = heldout.feature_mse(tiny, run, ids)
    assert 0 < mse == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert heldout.feature_mse(tiny, run, ids[:1]) == pytest.approx(want[0], rel=1e-5)


def test_forward_timing_is_the_papers_protocol(monkeypatch):
    """Only forwards are timed; sliding = the sum over sub-batches; warm-up passes, then one timed."""
    from spar_pipeline.windows import count_windows

    clock = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    model = CountingWindows(clock)
    single = timing.forward_time(model, "single", size=(64, 96), warmup=2, fresh=True)
    assert single.seconds == 1.0 and model.shapes == [(1, 3, 64, 96)] * 3 and not single.projected
    model.shapes.clear()
    n = count_windows(100, 150, 48, 16)  # 5 × 8 = 40 windows of 48 (boundary windows included)
    got = timing.forward_time(model, "sliding", 16, size=(100, 150), warmup=1, window_batch=7, fresh=True)
    assert got.windows == n == 40 and got.batches == 6 and got.seconds == n  # each window's second, summed
    assert [s[0] for s in model.shapes] == [7, 7, 7, 7, 7, 5] * 2 and {s[1:] for s in model.shapes} == {(3, 48, 48)}
    # projected from the first sub-batch: 7 windows timed, scaled to all 40
    part = timing.forward_time(model, "sliding", 16, size=(100, 150), warmup=0, window_batch=7, max_batches=1,
                               fresh=True)
    assert part.projected and part.timed_batches == 1 and part.seconds == pytest.approx(n)
    model.shapes.clear()  # measured once per configuration and process
    assert timing.forward_time(model, "sliding", 16, size=(100, 150), warmup=1, window_batch=7) == got
    assert model.shapes == []
    assert timing.PAPER_SIZE == (1024, 2048) and timing.PAPER_WARMUP == 10 and timing.PAPER_WINDOW_BATCH == 60
    with pytest.raises(ValueError, match="needs a stride"):
        timing.forward_time(model, "sliding", None)
    with pytest.raises(ValueError, match="choose from single, sliding"):
        timing.forward_time(model, "fast")


def test_evaluate_rows_time_forward_at_1024x2048_and_predict_apart(tmp_path):
    """forward_seconds: the paper's figure at the recipe's timing_size (here the paper's 1024×2048; tiny-cpu's
    own is 128×256), one per model × mode, the same for every dataset; predict_seconds: this dataset's
    end-to-end mean, its own figure."""
    root = striped_voc(tmp_path)
    (tmp_path / "b").symlink_to(root)
    recipe = load_recipe("tiny-cpu")
    recipe = dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, resize=(96, 64),
                                                                       timing_warmup=0, timing_size=(1024, 2048)))
    model = CountingWindows(Clock())
    rows = evaluate.run(None, {"voc21": str(root), "voc20": str(tmp_path / "b")}, modes=("single",),
                        backbone=model, recipe=recipe)
    assert {(r["forward_height"], r["forward_width"]) for r in rows} == {(1024, 2048)}
    assert (1, 3, 1024, 2048) in model.shapes  # the timed forward ran on the whole 1024×2048 image
    assert len({r["forward_seconds"] for r in rows}) == 1 and all(r["predict_seconds"] > 0 for r in rows)


def test_v1_evaluate_manifest_is_refused_with_the_way_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    old = pa.table({"model": ["pretrained"], "mode": ["single"], "stride": pa.array([0], pa.int32()),
                    "dataset": ["voc21"], "miou": [1.0], "seconds_per_image": [0.1],
                    "images": pa.array([1], pa.int32())})
    old = old.replace_schema_metadata({b"spar.stage": b"evaluate", b"spar.schema_version": b"1"})
    (tmp_path / "run" / "manifests" / "evaluate").mkdir(parents=True)
    pq.write_table(old, tmp_path / "run" / "manifests" / "evaluate" / "part-00000000000000000001-abcdef12.parquet")
    with pytest.raises(evaluate.EvaluateError, match=r"v1.*reads evaluate v3.*aside and evaluate again"):
        evaluate.run(run, {"voc21": str(striped_voc(tmp_path))}, backbone=OneHot())


def test_run_summary_speeds_are_measured_once_per_run_and_machine(tmp_path):
    """The held-out look's forward seconds (the paper's protocol at the recipe's timing_size, here 1024×2048)
    are kept in the run: a later `run` of the same backbone on the same machine reuses them; other settings
    measure again."""
    from spar_pipeline.report import look_speeds

    run = Run(str(tmp_path / "run"))
    recipe = load_recipe("tiny-cpu")
    run.resolve_recipe(dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, timing_warmup=0,
                                                                                timing_size=(1024, 2048))))
    model = CountingWindows(Clock())
    timing._MEASURED.clear()  # nothing measured yet in this process
    first = look_speeds(run, model, model)
    assert set(first) == {"single (student)", "sliding s=24 (teacher)", "sliding s=32 (teacher)"}
    assert (1, 3, 1024, 2048) in model.shapes and (tmp_path / "run" / "reports" / "forward_seconds.json").is_file()
    timing._MEASURED.clear()  # a new process
    model.shapes.clear()
    assert look_speeds(run, model, model) == first and model.shapes == []
    kept = (tmp_path / "run" / "reports" / "forward_seconds.json").read_text()
    (tmp_path / "run" / "reports" / "forward_seconds.json").write_text(kept.replace('"warmup": 0', '"warmup": 3'))
    look_speeds(run, model, model)
    assert model.shapes  # settings differ from the kept ones: measured again


def _parts(run: Run) -> list[str]:
    folder = Path(run.path("manifests", "evaluate"))
    return sorted(p.name for p in folder.glob("part-*.parquet")) if folder.is_dir() else []


def test_scale_and_stride_sweep_rows_class_iou_and_a_rerun_does_only_missing_rows(tmp_path):
    """(model, mode, stride, scale, dataset) rows: images resized to scale × the recipe's size, timed at
    scale × the timing size; per-class IoU in class order whose mean over present classes is the mIoU;
    a rerun evaluates nothing, a new scale only its own rows."""
    from spar_pipeline.datasets import class_lines, get_dataset

    root = striped_voc(tmp_path)  # 64×96 images; resize (96, 64) keeps them at 64×96
    run = Run(str(tmp_path / "run"))
    recipe = load_recipe("tiny-cpu")
    run.resolve_recipe(dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, resize=(96, 64),
                                                                                timing_warmup=0)))
    model = CountingWindows(Clock())
    timing._MEASURED.clear()
    sweep = dict(modes=("single", "sliding"), strides=[16, 32], backbone=model, timing_size=(96, 192))
    rows = evaluate.run(run, {"voc21": str(root)}, scales=[0.5, 1.0], **sweep)
    plan = [("single", 0), ("sliding", 16), ("sliding", 32)]
    assert [(r["model"], r["mode"], r["stride"], r["scale"]) for r in rows] == [
        ("pretrained", m, s, f) for m, s in plan for f in (0.5, 1.0)]
    assert {(r["scale"], r["forward_height"], r["forward_width"]) for r in rows} == {(0.5, 48, 96), (1.0, 96, 192)}
    assert (1, 3, 32, 48) in model.shapes and (1, 3, 48, 96) in model.shapes  # evaluated and timed at half size
    full = [r for r in rows if r["scale"] == 1.0]
    assert all(r["miou"] == pytest.approx(100.0) for r in full)  # the perfect predictor at its own resolution
    assert next(r for r in rows if r["scale"] == 0.5 and r["mode"] == "single")["miou"] < 99.0  # stripes blur

    bench = get_dataset("voc21", str(root))
    present = set().union(*(set(np.unique(bench[i][1]).tolist()) for i in range(len(bench)))) - {255}
    for r in read_manifest(run, "evaluate").to_pylist():
        assert r["class_names"] == [line.strip() for line in class_lines("voc21")] and len(r["class_iou"]) == 21
        assert np.nanmean(r["class_iou"]) == pytest.approx(r["miou"])
        if r["scale"] == 1.0:  # classes absent from ground truth and prediction are NaN, the others 100
            assert [c for c, v in enumerate(r["class_iou"]) if not math.isnan(v)] == sorted(present)
    md = (tmp_path / "run" / "reports" / "table.md").read_text()
    assert "| pretrained | sliding s=16 ×0.5 |" in md and "| pretrained | sliding s=16 |" in md

    before, model.shapes = _parts(run), []
    again = evaluate.run(run, {"voc21": str(root)}, scales=[1.0, 0.5], **sweep)
    assert _parts(run) == before and model.shapes == []  # nothing evaluated, nothing timed, nothing written
    assert sorted((r["mode"], r["stride"], r["scale"], r["miou"]) for r in again) == sorted(
        (r["mode"], r["stride"], r["scale"], r["miou"]) for r in rows)
    more = evaluate.run(run, {"voc21": str(root)}, scales=[0.75, 1.0], **sweep)
    assert len(_parts(run)) == len(before) + 3 and len(more) == 6  # only the three 0.75 rows were new
    assert read_manifest(run, "evaluate").num_rows == 9
    with pytest.raises(evaluate.EvaluateError, match=r"--scale 0.0: must be a number > 0"):
        evaluate.run(run, {"voc21": str(root)}, scales=[0.0], **sweep)


def test_student_names_resolve_through_weights_and_unknown_ones_are_refused(tmp_path, tiny, caplog):
    """A student's name is its best epoch (label = the name; where it lives is Run.student's); a weights
    file keeps its stem; an unknown name is one line listing the run's students, before any work; a weights
    file holding another text tower (another pretrained model) is scored, with a warning saying whose text
    features it was scored against."""
    import shutil

    from safetensors.torch import save_file

    from spar_pipeline import weights

    data = tmp_path / "data"
    make_synthetic("voc20", data, n=1, size=(48, 64))
    run = Run(str(tmp_path / "run"))
    recipe = load_recipe("tiny-cpu")
    run.resolve_recipe(dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, timing_warmup=0)))
    with pytest.raises(evaluate.EvaluateError, match="no best checkpoint yet for student 'default'"):
        weights.resolve_checkpoint(run, "default")
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    state[next(k for k in state if k.endswith("weight") and "trunk.blocks" in k)] += 0.5
    Path(run.path(*weights.BEST)).parent.mkdir(parents=True)
    save_file(state, run.path(*weights.BEST))
    assert weights.resolve_checkpoint(run, "default") == weights.resolve_checkpoint(run, "best") == run.path(*weights.BEST)
    assert run.path(*weights.BEST) == run.student("default").best_weights
    (tmp_path / "run" / "students" / "blk1").mkdir()
    (tmp_path / "run" / "students" / "blk1" / "student.toml").write_text('teacher = "default"\n')  # not trained yet
    with pytest.raises(evaluate.EvaluateError, match=r"no best checkpoint yet for student 'blk1'.*--student blk1"):
        weights.resolve_checkpoint(run, "blk1")

    with pytest.raises(weights.UnknownStudent) as refused:
        evaluate.run(run, {"voc20": str(data)}, checkpoints=["pretrained", "nosuch"])
    assert "\n" not in str(refused.value) and "no student 'nosuch' (students: blk1, default)" in str(refused.value)
    assert _parts(run) == []  # refused before any model ran

    copy = tmp_path / "copy.safetensors"
    shutil.copy(run.path(*weights.BEST), copy)
    rows = evaluate.run(run, {"voc20": str(data)}, checkpoints=["default", str(copy)], scales=[0.5],
                        timing_size=(64, 128))
    assert [(r["model"], r["scale"], r["forward_height"]) for r in rows] == [("default", 0.5, 32), ("copy", 0.5, 32)]
    assert rows[0]["miou"] == rows[1]["miou"] and rows[0]["class_iou"] == rows[1]["class_iou"]  # the same weights
    assert "text tower is not the pretrained model's" not in caplog.text  # a student's is the pretrained one

    other = {k: v.clone() for k, v in state.items()}  # another pretrained model: its own text tower
    other[next(k for k in other if k.startswith("model.text") or k.startswith("model.transformer"))] += 0.5
    save_file(other, tmp_path / "other.safetensors")
    with caplog.at_level(logging.WARNING, logger="spar_pipeline.evaluate"):
        evaluate.run(run, {"voc20": str(data)}, checkpoints=[str(tmp_path / "other.safetensors")], scales=[0.5])
    warned = [r.getMessage() for r in caplog.records if "text tower is not the pretrained model's" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("evaluate other:") and "[recipe] checkpoint" in warned[0]


def test_v2_evaluate_manifest_is_refused_with_the_way_out(tmp_path):
    """v2 rows have no scale and no per-class IoU; they are not guessed: one line says to move them aside."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    one = lambda v, t: pa.array([v], t)  # noqa: E731
    old = pa.table({"model": ["pretrained"], "mode": ["single"], "stride": one(0, pa.int32()), "dataset": ["voc21"],
                    "miou": [1.0], "forward_seconds": [0.1], "forward_height": one(1024, pa.int32()),
                    "forward_width": one(2048, pa.int32()), "predict_seconds": [0.2], "images": one(1, pa.int32())})
    old = old.replace_schema_metadata({b"spar.stage": b"evaluate", b"spar.schema_version": b"2"})
    (tmp_path / "run" / "manifests" / "evaluate").mkdir(parents=True)
    pq.write_table(old, tmp_path / "run" / "manifests" / "evaluate" / "part-00000000000000000001-abcdef12.parquet")
    with pytest.raises(evaluate.EvaluateError, match=r"v2.*reads evaluate v3.*aside and evaluate again") as e:
        evaluate.run(run, {"voc21": str(striped_voc(tmp_path))}, backbone=OneHot())
    assert "\n" not in str(e.value) and len(_parts(run)) == 1  # nothing added to the old manifest


def test_cli_scale_sweep_and_refusals(tmp_path):
    """`evaluate --scale F` (repeatable) through the real app: one printed row per scale; a scale ≤ 0 and
    an unknown student are one line each."""
    from typer.testing import CliRunner

    from spar_pipeline.cli import app

    data = tmp_path / "data"
    make_synthetic("voc20", data, n=1, size=(48, 64))
    cli = CliRunner()
    args = ["evaluate", "--recipe", "tiny-cpu", "--dataset", f"voc20={data}"]
    out = cli.invoke(app, [*args, "--scale", "0.5", "--scale", "0.25"])
    assert out.exit_code == 0, out.output
    lines = [l for l in out.output.splitlines() if l.strip().startswith("pretrained ")]  # the rows, not the log
    h, w = load_recipe("tiny-cpu").evaluate.timing_size
    assert len(lines) == 2 and "×0.5" in lines[0] and "×0.25" in lines[1]
    assert f"@{h // 2}×{w // 2}" in lines[0] and f"@{h // 4}×{w // 4}" in lines[1]  # timed at F × the timing size
    bad = cli.invoke(app, [*args, "--scale", "0"])
    assert bad.exit_code != 0 and "--scale 0.0: must be a number > 0" in bad.output
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    bad = cli.invoke(app, ["evaluate", "--run", run.url, "--dataset", f"voc20={data}", "--checkpoint", "nosuch"])
    assert bad.exit_code != 0 and "no student 'nosuch' (students: default)" in bad.output
    assert len([l for l in bad.output.splitlines() if l.strip()]) == 1


def test_images_run_one_per_thread_in_order_with_the_same_maps_and_threads_put_back(tiny):
    import threading

    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    text = tiny.class_embeddings(["a", "b", "c"], ["{}"])
    cfg = DatasetEval(logit_scale=50.0)
    images = [np.ascontiguousarray(np.roll(image, 7 * i, axis=1)) for i in range(7)]
    names: set[str] = set()

    def one(i: int):
        names.add(threading.current_thread().name)
        return i, segment.predict(tiny, images[i], text, cfg, (64, 48), "sliding", 16, 4)

    torch.set_num_threads(2)
    alone = [segment.predict(tiny, im, text, cfg, (64, 48), "sliding", 16, 4) for im in images]
    got = list(evaluate._images_in_parallel(one, len(images), torch.device("cpu")))
    assert [i for i, _ in got] == list(range(7))  # in order, every one
    assert all(np.array_equal(a, b) for a, (_, b) in zip(alone, got))  # one thread per image: the same maps
    assert len(names) == 2 and all(n.startswith("evaluate") for n in names)
    assert torch.get_num_threads() == 2

    ran: list[int] = []

    def failing(i: int):
        ran.append(i)
        if i == 1:
            raise ValueError("image 1: not a PNG")
        return i

    with pytest.raises(ValueError, match="image 1"):
        list(evaluate._images_in_parallel(failing, 50, torch.device("cpu")))
    assert torch.get_num_threads() == 2 and len(ran) < 50  # the rest is not run after an error
    names.clear()
    assert [i for i, _ in evaluate._images_in_parallel(one, 3, torch.device("cuda"))] == [0, 1, 2]  # a GPU: in turn
    assert names == {threading.current_thread().name}


def test_students_finish_the_pretrained_single_passes_they_share_with_the_same_rows(tmp_path, tiny):
    """On a CPU the pretrained single pass keeps the blocks ``[train] trainable`` leaves frozen, and a student
    whose frozen blocks are the pretrained ones finishes those passes instead of running them again: the same
    rows (mIoU and per-class IoU) as each model evaluated alone; a student that changed an early block runs
    its own."""
    from safetensors.torch import save_file

    from spar_pipeline.prefixes import PrefixCache

    data = tmp_path / "data"
    make_synthetic("voc20", data, n=3, size=(48, 64))
    recipe = load_recipe("tiny-cpu")
    recipe = dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, timing_warmup=0))
    blocks = [k for k, v in tiny.state_dict().items() if "trunk.blocks" in k and k.endswith("weight") and v.ndim == 2]
    files = {}
    for name, key in (("late", blocks[-1]), ("early", blocks[0])):
        state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
        state[key] += 0.05 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(1))
        files[name] = str(tmp_path / f"{name}.safetensors")
        save_file(state, files[name])
    rows = {}
    for shared in (False, True):
        run = Run(str(tmp_path / f"run{int(shared)}"))
        run.resolve_recipe(recipe)
        kept = PrefixCache() if shared else None
        rows[shared] = [r for ck in ("pretrained", files["late"], files["early"])
                        for r in evaluate.run(run, {"voc20": str(data)}, checkpoints=[ck], scales=[1.0, 2.0],
                                              timing_size=(32, 64), prefixes=kept)]
    key = [(r["model"], r["scale"], r["miou"], r["class_iou"]) for r in rows[False]]
    assert key == [(r["model"], r["scale"], r["miou"], r["class_iou"]) for r in rows[True]]
    assert len({r["miou"] for r in rows[False] if r["scale"] == 2.0}) > 1  # the three models differ
    # 3 images × 2 scales: kept by pretrained, finished by "late"; "early" made (and kept) its own
    assert (kept.misses, kept.hits, len(kept)) == (12, 6, 12)
