"""train, evaluate and the picture tools as a user types them, then `run` end to end and again."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spar_pipeline import manifest
from spar_pipeline.datasets import make_synthetic
from spar_pipeline.run import Run
from spar_pipeline.mini.sa1b_writer import make_sa1b_source

from _cli import EXE, cli  # tests/ is on sys.path (tests/conftest.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("student")
    make_sa1b_source(tmp / "src", n_tars=2, per_tar=4, seed=3)
    run = str(tmp / "run")
    cli("ingest", str(tmp / "src" / "*.tar"), "--run", run, "--recipe", "tiny-cpu")
    cli("augment", "--run", run)
    cli("extract", "--run", run, "--workers", "1")
    out = cli("train", "--run", run, "--epochs", "2")
    assert "train:" in out.stdout
    return run, tmp


def test_train_writes_epochs_best_and_resumes_to_nothing(trained):
    run, _ = trained
    rows = manifest.read_manifest(Run(run).student(), "train").to_pylist()
    assert sorted(r["epoch"] for r in rows) == [0, 1]
    assert all(np.isfinite(r["val_mse"]) and r["baseline_val_mse"] > 0 for r in rows)
    assert (Path(run) / "students" / "default" / "checkpoints" / "best.safetensors").is_file()
    cli("train", "--run", run, "--epochs", "2")  # a rerun finds both epochs done
    assert len(manifest.read_manifest(Run(run).student(), "train")) == 2
    # feature-level evaluation needs no benchmark: the same held-out MSE the trainer reported
    out = cli("evaluate", "--run", run, "--checkpoint", "pretrained", "--checkpoint", "best").stdout
    mse = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if "held-out teacher MSE" in line}
    assert mse["pretrained"] == pytest.approx(rows[0]["baseline_val_mse"], rel=1e-3)
    assert mse["best"] == pytest.approx(min(r["val_mse"] for r in rows), rel=1e-3)
    status = cli("status", "--run", run).stdout
    assert "train" in status
    from spar_pipeline.status import stage_status

    speed = {row["stage"]: row["items_per_second"] for row in stage_status(Run(run))}
    assert set(speed) == {"ingest", "augment", "extract", "train"} and all(v > 0 for v in speed.values()), speed


def test_train_errors_are_one_line(trained, tmp_path):
    run, _ = trained
    out = cli("train", "--run", run, "--gpus", "0,x", check=False)
    assert out.returncode == 2 and "--gpus" in out.stderr and "Traceback" not in out.stderr
    out = cli("train", "--run", run, "--trainable", "blk_99", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "blk_99" in out.stderr


def test_train_refuses_processes_that_do_not_divide_images_per_step(trained):
    run, _ = trained  # tiny-cpu: images_per_step = 1
    out = cli("train", "--run", run, "--processes", "2", check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert "images_per_step=1" in lines[0] and "2 processes" in lines[0]


def test_evaluate_compares_models_and_modes(trained):
    run, tmp = trained
    data = make_synthetic("cityscapes", tmp / "data", n=2, size=(64, 128))
    out = cli("evaluate", "--run", run, "--dataset", f"cityscapes={data / 'cityscapes'}", "--checkpoint", "pretrained",
              "--checkpoint", "best", "--mode", "single", "--mode", "sliding", "--stride", "32")
    rows = manifest.read_manifest(Run(run), "evaluate").to_pylist()
    keys = {(r["model"], r["mode"], r["stride"]) for r in rows}
    assert keys == {("pretrained", "single", 0), ("pretrained", "sliding", 32), ("best", "single", 0),
                    ("best", "sliding", 32)}
    assert all(0 <= r["miou"] <= 100 and r["forward_seconds"] > 0 and r["images"] == 2 for r in rows)
    assert out.stdout.count("mIoU") == 4
    with open(Path(run) / "reports" / "table.csv") as f:
        table = list(csv.reader(f))
    assert table[0][:2] == ["model", "mode"] and len(table) == 5
    again = cli("evaluate", "--run", run, "--dataset", f"cityscapes={data / 'cityscapes'}")
    assert len(manifest.read_manifest(Run(run), "evaluate")) == 4 and "mIoU" in again.stdout  # skipped, not redone
    bad = cli("evaluate", "--run", run, "--dataset", "cityscapes", check=False)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr
    bad = cli("evaluate", "--run", run, "--dataset", "nosuch=/x", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_picture_tools(trained):
    run, tmp = trained
    img = tmp / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(img)
    seg = tmp / "seg.png"
    out = cli("segment", str(img), "--classes", "background; sky; road, street", "--run", run, "--checkpoint", "best",
              "--out", str(seg))
    assert "classes present" in out.stdout and Image.open(seg).size == (160, 96)
    npy = tmp / "f.npy"
    cli("features", str(img), "--run", run, "--out", str(npy))
    arr = np.load(npy, allow_pickle=False)
    assert arr.shape[:2] == (96 // 16, 160 // 16) and arr.dtype == np.float32 and np.isfinite(arr).all()
    pca = tmp / "pca.png"
    out = cli("pca", str(img), "--run", run, "--out", str(pca))
    assert "student: best" in out.stdout and Image.open(pca).size == (320, 96)
    bad = cli("segment", str(tmp / "missing.png"), "--classes", "a, b", "--backbone", "tiny-siglip", check=False)
    assert bad.returncode == 2 and "missing.png" in bad.stderr and "Traceback" not in bad.stderr


def test_run_end_to_end_then_nothing_left(tmp_path):
    """The default (tiny-cpu) run end to end: the student ends closer to the teacher than the pretrained model."""
    run = str(tmp_path / "demo")
    bench = f"cityscapes={make_synthetic('cityscapes', tmp_path / 'data', n=2, size=(64, 128)) / 'cityscapes'}"
    out = cli("run", "--run", run, "--dataset", bench)
    summary = (Path(run) / "reports" / "summary.md").read_text()
    assert out.stdout.strip().startswith("# spar-pipeline run summary")
    for section in ("| extract |", "Training (held-out MSE", "Single pass against sliding window", "pca:", "segmentation:"):
        assert section in summary, section
    pictures = [p for p in (Path(run) / "reports").glob("*.png")]
    assert {p.name.split("_")[0] for p in pictures} == {"pca", "segmentation"}
    epochs = manifest.read_manifest(Run(run).student(), "train").to_pylist()
    assert len(epochs) == Run(run).recipe.train.epochs
    assert min(e["val_mse"] for e in epochs) < 0.95 * epochs[0]["baseline_val_mse"]
    owner = lambda s: {"extract": Run(run).teacher(), "train": Run(run).student()}.get(s, Run(run))  # noqa: E731
    counts = {s: len(manifest.read_manifest(owner(s), s)) for s in ("ingest", "augment", "extract", "train")}
    evaluated = lambda: manifest.read_manifest(Run(run), "evaluate").to_pylist()  # noqa: E731
    parts = lambda: len(list((Path(run) / "manifests" / "evaluate").glob("*.parquet")))  # noqa: E731
    rows, before = evaluated(), parts()
    again = cli("run", "--run", run, "--dataset", bench)
    assert {s: len(manifest.read_manifest(owner(s), s)) for s in counts} == counts and parts() == before > 0
    assert "# spar-pipeline run summary" in again.stdout
    further = Run(run).recipe.train.epochs + 1
    cli("run", "--run", run, "--dataset", bench, "--epochs", str(further))  # a further epoch: a new student
    assert len(manifest.read_manifest(Run(run).student(), "train")) == further
    assert parts() > before  # the student evaluated again
    key = lambda r: (r["model"], r["mode"], r["stride"], r["scale"], r["dataset"])  # noqa: E731
    assert sorted(key(r) for r in evaluated()) == sorted(key(r) for r in rows)  # its rows replaced, not added


def test_run_killed_mid_extract_then_rerun_finishes(tmp_path):
    """SIGKILL of `spar-pipeline run` (and its Dask workers) once the first maps are stored; the same
    command again finishes every stage with each image exactly once."""
    import os
    import signal
    import subprocess
    import time

    run = tmp_path / "demo"
    proc = subprocess.Popen([EXE, "run", "--run", str(run), "--epochs", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        parts = run / "teachers" / "default" / "manifests" / "extract"
        while not list(parts.glob("*.parquet")) and proc.poll() is None:
            assert time.monotonic() < deadline, "extract never wrote a manifest part"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "reports" / "summary.md").exists()  # killed before the end
    cli("run", "--run", str(run), "--epochs", "1")
    r = Run(str(run))
    for stage in ("ingest", "augment", "extract"):
        owner = r.teacher() if stage == "extract" else r
        ids = [x["image_id"] for x in manifest.read_manifest(owner, stage).to_pylist() if x["status"] == "ok"]
        assert len(ids) == len(set(ids)) == 36, stage
    from spar_pipeline.store import FeatureStore

    store = FeatureStore.open(r.teacher().store_url)
    for row in manifest.read_manifest(r.teacher(), "extract").to_pylist():
        assert store.verify(row["image_id"], (row["grid_h"], row["grid_w"], row["dim"]), row["checksum"]) is None
    assert len(manifest.read_manifest(r.student(), "train")) == 1 and (run / "reports" / "summary.md").exists()
