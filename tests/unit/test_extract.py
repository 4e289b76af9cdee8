"""extract: real LocalCluster workers, a real Zarr store, moto S3, SIGKILL and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spar_pipeline import extract, manifest
from spar_pipeline.backbones import build
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore, StoreError
from spar_pipeline.windows import sliding_features

from _extracted import check_done_once, prepare, teacher_by_hand  # tests/ is on sys.path (tests/conftest.py)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    run = prepare(str(tmp / "run"), tmp / "src")
    report = extract.run(run, workers=2, progress=False)
    return run, report


def test_two_worker_processes_store_the_teacher(local_run):
    run, report = local_run
    rows = check_done_once(run)
    assert report["done"] == len(rows) == 8 and report["workers"] >= 1
    assert all(r["windows"] >= 1 and r["fingerprint"] for r in rows)
    store = FeatureStore.open(run.teacher().store_url)
    for r in rows[:3]:
        got = store.read(r["image_id"])
        want = teacher_by_hand(run, r["image_id"])
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    summary = manifest.read_manifest(run, "summary").to_pylist()
    assert summary[-1]["stage"] == "extract" and summary[-1]["windows_per_second"] > 0


def test_rerun_does_nothing(local_run):
    run, _ = local_run
    before = manifest.read_manifest(run.teacher(), "extract").to_pylist()
    assert extract.run(run, workers=1, progress=False)["done"] == 0
    assert manifest.read_manifest(run.teacher(), "extract").to_pylist() == before


def test_other_teacher_refused(local_run, tmp_path):
    run, _ = local_run
    with pytest.raises(StoreError):
        FeatureStore.open(run.teacher().store_url, fingerprint={"backbone": "other", "digest": "x"})


def test_s3_run(s3_bucket, tmp_path):
    run = prepare(f"{s3_bucket}/run", tmp_path / "src", n_tars=1, per_tar=3)
    extract.run(run, workers=1, progress=False)
    rows = check_done_once(run)
    got = FeatureStore.open(run.teacher().store_url).read(rows[0]["image_id"])
    np.testing.assert_allclose(got.astype(np.float32), teacher_by_hand(run, rows[0]["image_id"]), rtol=2e-3, atol=2e-3)


def test_nan_maps_are_rejected_and_run_goes_on(tmp_path):
    from safetensors.torch import save_file

    b = build("tiny-siglip")
    state = {k: v.clone().contiguous() for k, v in b.state_dict().items()}
    key = next(k for k in state if k.endswith("weight") and state[k].is_floating_point() and "norm" not in k)
    state[key][...] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(state, str(ckpt))
    from spar_pipeline.resources import stages_dir

    recipe = tmp_path / "nan.toml"
    recipe.write_text((stages_dir() / "tiny-cpu.toml").read_text().replace('checkpoint = ""', f'checkpoint = "{ckpt}"'))
    run = prepare(str(tmp_path / "run"), tmp_path / "src", n_tars=1, per_tar=2, recipe=str(recipe))
    extract.run(run, workers=1, progress=False)
    rows = manifest.read_manifest(run.teacher(), "extract").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "rejected" and "NaN" in r["reason"] for r in rows)


def _extract_cmd(run: Run, workers: int = 1) -> list[str]:
    exe = Path(sys.executable).with_name("spar-pipeline")
    return [str(exe), "extract", "--run", run.url, "--workers", str(workers)]


def _wait_for_parts(run: Run, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(manifest._part_names(run.teacher(), "extract")) >= n or proc.poll() is not None:
            return
        time.sleep(0.05)
    raise TimeoutError("extract made no progress")


def test_sigkill_client_then_rerun_finishes(tmp_path):
    run = prepare(str(tmp_path / "run"), tmp_path / "src", n_tars=2, per_tar=6)
    proc = subprocess.Popen(_extract_cmd(run), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_parts(run, 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local workers, as a machine crash would
    proc.wait()
    partial = manifest.read_manifest(run.teacher(), "extract").num_rows
    assert 0 < partial < 12
    done = subprocess.run(_extract_cmd(run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = check_done_once(run)
    assert len(rows) == 12


def test_worker_killed_mid_stage_completes(tmp_path):
    import psutil

    run = prepare(str(tmp_path / "run"), tmp_path / "src", n_tars=2, per_tar=6)
    proc = subprocess.Popen(_extract_cmd(run, workers=2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_parts(run, 1, proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]  # dask worker processes
    assert workers, "no worker process found"
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert len(check_done_once(run)) == 12


def test_gpu_ids_count_the_devices_this_process_sees(monkeypatch):
    from spar_pipeline.engine import worker_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [worker_device(g) for g in (0, 1)] == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert [worker_device(g) for g in (0, 1)] == ["2", "3"]


def test_int8_store_recipe_extracts_and_trains(tmp_path):
    """[extract] store_dtype = "int8": the store holds packed int8 maps close to the float16 teacher,
    its fingerprint says int8, and train reads it."""
    from spar_pipeline import train
    from spar_pipeline.resources import stages_dir

    text = (stages_dir() / "tiny-cpu.toml").read_text()
    text = text.replace("images_per_task = 4", 'images_per_task = 4\nstore_dtype = "int8"\ncodec = "none"')
    recipe = tmp_path / "int8.toml"
    recipe.write_text(text)
    run = prepare(str(tmp_path / "run"), tmp_path / "src", n_tars=1, per_tar=4, recipe=str(recipe))
    extract.run(run, workers=1, progress=False)
    rows = check_done_once(run)
    store = FeatureStore.open(run.teacher().store_url)
    assert store.dtype == "int8" and store.fingerprint["dtype"] == "int8"
    first = rows[0]["image_id"]
    ref, got = teacher_by_hand(run, first).astype(np.float64), store.read(first).astype(np.float64)
    assert np.mean((ref - got) ** 2) / np.mean(ref ** 2) < 1e-3
    raw = (Path(run.url) / "teachers/default/features.zarr/maps" / str(first) / "c/0/0").stat().st_size
    assert raw < 0.6 * got.size * 2  # about half of float16's bytes
    report = train.run(run, epochs=1, progress=False, stop_after_steps=2)
    assert report["steps_this_run"] == 2 and np.isfinite(report["baseline_val_mse"])


def test_cpu_autocast_only_when_the_recipe_says_bf16():
    """precision "bf16" runs the CPU teacher under bf16 autocast, close to float32; "fp16" and
    "fp32" keep float32 on CPU; on CUDA the recipe's dtype is used as is."""
    from dataclasses import replace

    from spar_pipeline.recipe import load_recipe

    cfg = replace(load_recipe("tiny-cpu").extract, precision="fp16")
    spec = extract.ExtractSpec("", {}, "tiny-siglip", "", cfg, 1, {})
    with_precision = lambda p: replace(spec, extract=replace(cfg, precision=p))  # noqa: E731
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert extract._autocast_dtype(spec, cpu) is None
    assert extract._autocast_dtype(with_precision("fp32"), cpu) is None
    assert extract._autocast_dtype(with_precision("bf16"), cpu) is torch.bfloat16
    assert extract._autocast_dtype(spec, cuda) is torch.float16
    assert extract._autocast_dtype(with_precision("fp32"), cuda) is None
    b = build("tiny-siglip").eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = sliding_features(b, x, window=64, stride=24)
        amp = sliding_features(b, x, window=64, stride=24, autocast_dtype=torch.bfloat16)
    rel = float(((amp.float() - ref) ** 2).sum() / (ref ** 2).sum())
    assert 0 < rel < 1e-3, rel  # bf16 changed the numbers, a little
