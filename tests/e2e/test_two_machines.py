"""Two machines, simulated honestly: a `dask scheduler` and two `dask worker` processes from the
command line, each in its own directory with nothing local in common, and a moto S3 server
holding the source tars and the run. The client and the trainer are two more directories."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from spar_pipeline import manifest
from spar_pipeline.run import Run
from spar_pipeline.status import stage_status
from spar_pipeline.store import FeatureStore
from spar_pipeline.mini.sa1b_writer import make_sa1b_source

BIN = Path(sys.executable).parent
HOST = socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """What a machine of the cluster gets: PATH, the AWS_* credentials and an offline hub; no shared dirs."""
    keep = ("PATH", "HOME", "LANG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
    return env


class Machine:
    """One process group standing for one machine: killed whole, as a crash would."""

    def __init__(self, name: str, root: Path, cmd: list[str]):
        self.name, self.dir = name, root / name
        self.dir.mkdir()
        self.log = open(self.dir / "log.txt", "w")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def worker_ids(self) -> set[str]:
        """The ids extract writes in its `worker` column (host:pid) for this machine's processes."""
        import psutil

        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return {f"{HOST}:{p.pid}" for p in procs}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def output(self) -> str:
        return (self.dir / "log.txt").read_text()


@pytest.fixture
def cluster(tmp_path, s3_server):
    """A scheduler and two GPU-resourced workers on 127.0.0.1, each a `machine` with its own directory."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    machines = []
    try:
        machines.append(Machine("scheduler", tmp_path, [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                                        "--port", str(port), "--no-dashboard"]))
        for name in ("gpu-a", "gpu-b"):
            machines.append(Machine(name, tmp_path, [
                str(BIN / "dask"), "worker", address, "--nthreads", "1", "--resources", "GPU=1", "--name", name,
                "--local-directory", str(tmp_path / name / "dask"), "--death-timeout", "60"]))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            yield address, {m.name: m for m in machines}, client, tmp_path
    finally:
        for m in reversed(machines):
            m.kill()


def _cli(cwd: Path, *args: str, timeout: float = 300) -> str:
    out = subprocess.run([str(BIN / "spar-pipeline"), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"spar-pipeline {args[0]} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _upload_source(bucket: str, local: Path, n_tars: int, per_tar: int) -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    for tar in make_sa1b_source(local, n_tars=n_tars, per_tar=per_tar, size=(160, 112), seed=3):
        fs.put(str(tar), f"{bucket}/source/{tar.name}")
    return f"{bucket}/source/*.tar"


def _prepare(bucket: str, root: Path, n_tars: int, per_tar: int, cli: bool = True) -> tuple[str, Path]:
    """Tars uploaded from a scratch dir that is then deleted; ingest and augment from the client
    machine (through the CLI, or in this process where the test is about extract only)."""
    import shutil

    from spar_pipeline import augment, ingest

    scratch = root / "upload"
    source = _upload_source(bucket, scratch, n_tars, per_tar)
    shutil.rmtree(scratch)
    client_dir = root / "client"
    client_dir.mkdir()
    run = f"{bucket}/run"
    if cli:
        _cli(client_dir, "ingest", source, "--run", run, "--recipe", "tiny-cpu")
        _cli(client_dir, "augment", "--run", run)
    else:
        r = Run(run)
        r.resolve_recipe("tiny-cpu")
        ingest.run(r, [source])
        augment.run(r)
    return run, client_dir


def _all_rows(run: Run, stage: str) -> list[dict]:
    """Every row of every part, not just the latest per image: duplicates show up here."""
    _, tables = manifest._read_parts(run, stage)
    return pa.concat_tables(tables).to_pylist() if tables else []


def _check_maps(run: Run, rows: list[dict]) -> None:
    store = FeatureStore.open(run.teacher().store_url, storage_options=run.storage_options)
    for r in rows:
        assert store.verify(r["image_id"], (r["grid_h"], r["grid_w"], r["dim"]), r["checksum"]) is None
        fmap = store.read(r["image_id"])
        assert fmap.dtype == np.float16 and fmap.shape == (r["grid_h"], r["grid_w"], r["dim"])
        assert np.isfinite(fmap).all() and fmap.std() > 0


def _no_local_run(*dirs: Path) -> None:
    """Nothing of the run was written to a machine's own disk: it lives on S3 only."""
    for d in dirs:
        found = [p for p in d.rglob("*") if p.name in ("features.zarr", "manifests", "run.toml", "checkpoints")]
        assert not found, f"{d.name} wrote run files locally: {found}"


def test_ingest_augment_extract_on_two_workers_then_train_elsewhere(cluster, s3_bucket):
    address, machines, client, root = cluster
    run_url, client_dir = _prepare(s3_bucket, root, n_tars=2, per_tar=6)

    out = _cli(client_dir, "extract", "--run", run_url, "--scheduler", address)
    assert "2 workers" in out, out

    run = Run(run_url)
    planned = sorted(manifest.read_manifest(run, "augment")["image_id"].to_pylist())
    assert len(planned) == 12
    rows = _all_rows(run.teacher(), "extract")
    assert sorted(r["image_id"] for r in rows) == planned, "every image exactly once"
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    _check_maps(run, rows)
    by_machine = {name: sum(r["worker"] in machines[name].worker_ids() for r in rows) for name in ("gpu-a", "gpu-b")}
    assert all(by_machine.values()) and sum(by_machine.values()) == 12, by_machine

    trainer = root / "trainer"
    trainer.mkdir()
    _cli(trainer, "train", "--run", run_url, "--epochs", "1")
    epochs = manifest.read_manifest(run.student(), "train").to_pylist()
    assert epochs and np.isfinite(epochs[-1]["val_mse"])
    assert run.student().exists("checkpoints", "best.safetensors")
    extract_status = next(s for s in stage_status(Run(run_url)) if s["stage"] == "extract")
    assert (extract_status["planned"], extract_status["done"], extract_status["pending"]) == (12, 12, 0)
    _no_local_run(client_dir, trainer, *(m.dir for m in machines.values()))


def _processing(client, machine: "Machine") -> list[str]:
    """Task keys the scheduler has handed to this machine's worker and not yet seen finish."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    addr = next(a for a, w in info.items() if w.get("name") == machine.name)
    return [str(k) for k in client.processing([addr]).get(addr, ())]


def test_worker_machine_killed_mid_extract_the_other_finishes(cluster, s3_bucket):
    address, machines, client, root = cluster
    run_url, client_dir = _prepare(s3_bucket, root, n_tars=2, per_tar=8, cli=False)
    run = Run(run_url)
    proc = subprocess.Popen([str(BIN / "spar-pipeline"), "extract", "--run", run_url, "--scheduler", address],
                            cwd=client_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Mid-stage: a batch is stored and both machines hold work. Kill the one holding more.
        deadline = time.time() + 240
        victim, held = None, []
        while time.time() < deadline and proc.poll() is None:
            if manifest._part_names(run.teacher(), "extract"):
                loads = {n: _processing(client, machines[n]) for n in ("gpu-a", "gpu-b")}
                name = max(loads, key=lambda n: len(loads[n]))
                if loads[name]:
                    victim, held = machines[name], loads[name]
                    victim.kill()
                    break
            time.sleep(0.05)
        assert victim is not None, "extract finished before a worker could be killed mid-stage"
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out

    rows = manifest.read_manifest(run.teacher(), "extract").to_pylist()
    planned = sorted(manifest.read_manifest(run, "augment")["image_id"].to_pylist())
    assert sorted(r["image_id"] for r in rows) == planned and len(planned) == 16
    assert all(r["status"] == "ok" for r in rows)
    _check_maps(run, rows)
    survivor = machines["gpu-a" if victim.name == "gpu-b" else "gpu-b"].worker_ids()
    # Batch keys are extract-<first image id>-<uuid>: the killed machine's batches were redone by the survivor.
    firsts = {int(k.split("-")[1]) for k in held}
    redone = [r for r in rows if r["image_id"] in firsts and r["worker"] in survivor]
    assert redone, f"none of the killed machine's batches {sorted(firsts)} finished on the survivor"
