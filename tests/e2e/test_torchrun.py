"""train under torchrun on CPU (gloo): one machine against the spawn path, two "nodes" on 127.0.0.1 that
train, lose a node and resume, and the refusals; the Slurm job script's flags.

Every torchrun here is the real one (``.venv/bin/torchrun``) in its own session, with a timeout, and
killed with its workers when a test ends: nothing may hang the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spar_pipeline import augment, extract, ingest, manifest, train
from spar_pipeline.errors import TrainError
from spar_pipeline.mini.sa1b_writer import make_sa1b_source
from spar_pipeline.run import Run

from _extracted import tiny_recipe  # tests/ is on sys.path (tests/conftest.py)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
EPOCHS, PER_STEP = 2, 2
TIMEOUT = 240  # seconds any one torchrun may take here (2 loaded cores); the suite's own limit is 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", SPAR_COLLECTIVE_TIMEOUT_S="60")
    env.pop("RANK", None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """One run with 12 images through ingest, augment and extract (10 train, 2 held out), shared by every
    test here: images_per_step 2, a step checkpoint every 2 steps, no loader workers."""
    tmp = tmp_path_factory.mktemp("torchrun")
    tiny_recipe(tmp / "recipe.toml", lr="1e-4", holdout_fraction="0.25", checkpoint_every="2", epochs=str(EPOCHS),
                loader_workers="0", images_per_step=str(PER_STEP))
    tars = make_sa1b_source(tmp / "src", n_tars=1, per_tar=12, size=(128, 96), seed=1)
    run = Run(str(tmp / "base"))
    run.resolve_recipe(str(tmp / "recipe.toml"))
    ingest.run(run, [str(t) for t in tars])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    return tmp / "base"


def _copy(prepared: Path, dst: Path) -> Path:
    shutil.copytree(prepared, dst)
    return dst


def _rows(run: Path) -> list[dict]:
    return sorted(manifest.read_manifest(Run(str(run)).student(), "train").to_pylist(), key=lambda r: r["epoch"])


def _checkpoints(run: Path) -> list[int]:
    """Steps of the intact (JSON-marked) checkpoints, wherever the run keeps them."""
    return sorted(int(p.stem.split("-")[1]) for p in run.rglob("ckpt-*.json"))


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trainable weights of the checkpoint at ``step``."""
    (path,) = run.rglob(f"ckpt-{step:09d}.safetensors")
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def _assert_same_training(a: Path, b: Path) -> None:
    """The same optimizer steps: weights of the last checkpoint and every epoch's figures."""
    total = _checkpoints(b)[-1]
    assert _checkpoints(a)[-1] == total
    wa, wb = _weights(a, total), _weights(b, total)
    assert wa and wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    ra, rb = _rows(a), _rows(b)
    assert [(r["epoch"], r["step"]) for r in ra] == [(r["epoch"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_mse"] == pytest.approx(y["val_mse"], rel=1e-5)


class Node:
    """One torchrun process standing for one machine; ``kill`` takes its workers with it, as a crash would."""

    def __init__(self, cmd: list[str], log: Path, **env: str):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=log.parent, env=_env(**env), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def _tree(self):
        import psutil

        try:
            me = psutil.Process(self.proc.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        for p in self._tree():  # torchrun puts its workers in sessions of their own
            try:
                p.send_signal(sig)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.proc.args[:8]}... still running after {timeout}s:\n{self.output()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()


def _torchrun(*launch: str) -> list[str]:
    return [str(BIN / "torchrun"), *launch]


def _two_nodes(run: Path, logs: Path, tag: str) -> list[Node]:
    """Two torchrun "machines" on 127.0.0.1 (static rendezvous), one process each: WORLD_SIZE 2."""
    port = str(_free_port())
    return [Node(_torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                           "--master-addr", "127.0.0.1", "--master-port", port,
                           "-m", "spar_pipeline.train", "--", "--run", str(run)), logs / f"{tag}-node{rank}.log")
            for rank in (0, 1)]


def _summary_lines(out: str) -> list[str]:
    return re.findall(r"(?m)^train: step \d+ \(.*$", out)


@pytest.fixture(scope="module")
def spawned(prepared, tmp_path_factory) -> Path:
    """The reference: ``train --processes 2`` (mp.spawn, gloo), uninterrupted."""
    run = _copy(prepared, tmp_path_factory.mktemp("spawned") / "run")
    train.run(Run(str(run)), processes=2, progress=False)
    return run


def test_torchrun_one_node_two_processes_equals_spawn(spawned, prepared, tmp_path):
    """``train --launcher torchrun --processes 2`` prints ``torchrun --standalone --nnodes 1
    --nproc-per-node 2 -m spar_pipeline.train -- --run R`` and runs it: the same optimizer steps as
    ``--processes 2`` (spawn), one summary line, one manifest row per epoch (rank 0 alone writes)."""
    run = _copy(prepared, tmp_path / "run")
    out = subprocess.run([str(BIN / "spar-pipeline"), "train", "--run", str(run), "--processes", "2",
                          "--launcher", "torchrun"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (shown,) = re.findall(r"(?m)^train: CUDA_VISIBLE_DEVICES= (\S*torchrun .*)$", out.stdout)
    launch = "--standalone --nnodes 1 --nproc-per-node 2 -m spar_pipeline.train -- --run"
    assert shown == f"{BIN / 'torchrun'} {launch} {run}"
    (line,) = _summary_lines(out.stdout)
    assert "2 process(es), 2 image(s) per step" in line
    assert [r["epoch"] for r in _rows(run)] == list(range(EPOCHS))
    _assert_same_training(run, spawned)


def test_two_nodes_lose_one_then_resume_from_the_last_checkpoint(spawned, prepared, tmp_path):
    """Two nodes train; node 1 freezes then dies mid-epoch; node 0 gives up in bounded time with one
    line; both rerun and finish from the newest checkpoint with the state an uninterrupted run has.
    The crashed state also resumes on one process (another node count: images_per_step 2 divides)
    and is refused in one line by 3 processes (it does not)."""
    run = _copy(prepared, tmp_path / "run")
    nodes = _two_nodes(run, tmp_path, "first")
    try:
        t0 = time.monotonic()
        while not _checkpoints(run):  # the first step checkpoint (step 2 of 10): stop node 1 there
            assert nodes[0].proc.poll() is None and time.monotonic() - t0 < TIMEOUT, nodes[0].output()[-3000:]
            time.sleep(0.02)
        nodes[1].signal(signal.SIGSTOP)  # node 0 can go at most to its next collective
        time.sleep(1)
        nodes[1].signal(signal.SIGKILL)
        assert nodes[0].wait() != 0
        nodes[1].wait()
    finally:
        for n in nodes:
            n.close()
    assert re.search(r"(?m)^error: rank 0 of 2: another training process died or stopped answering \(.+\); rerun",
                     nodes[0].output()), nodes[0].output()[-3000:]
    crashed = _checkpoints(run)
    assert crashed and crashed[-1] < _checkpoints(spawned)[-1] and len(_rows(run)) < EPOCHS  # it stopped mid-way
    one = _copy(run, tmp_path / "one-process")

    nodes = _two_nodes(run, tmp_path, "again")
    try:
        assert [n.wait() for n in nodes] == [0, 0], nodes[0].output()[-3000:] + nodes[1].output()[-3000:]
    finally:
        for n in nodes:
            n.close()
    assert f"resumed from step {crashed[-1]} " in nodes[0].output()
    _assert_same_training(run, spawned)

    train.run(Run(str(one)), processes=1, progress=False)  # the same crash resumed by 1 process instead of 2
    _assert_same_training(one, spawned)


def test_torchrun_world_that_does_not_divide_images_per_step_is_refused(prepared, tmp_path, monkeypatch):
    """WORLD_SIZE=3 against images_per_step=2: one line, before the process group is joined (a real
    3-process torchrun would print the same line three times)."""
    run = _copy(prepared, tmp_path / "run")
    for k, v in dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", LOCAL_WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port()), SPAR_COLLECTIVE_TIMEOUT_S="20").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TrainError, match=r"^torchrun's WORLD_SIZE=3 \(nodes x processes per node\) does not divide "
                                         r"\[train\].images_per_step=2: use 1 or 2 processes in all"):
        train.run(Run(str(run)), progress=False)
    with pytest.raises(TrainError, match="--gpus/--processes under torchrun"):
        train.run(Run(str(run)), processes=3, progress=False)
    assert not _checkpoints(run) and not torch.distributed.is_initialized()


def test_printed_command_masks_credentials_in_storage_options():
    from spar_pipeline.cli.launcher import shown

    line = shown(["torchrun", "-m", "spar_pipeline.train", "--", "--run", "s3://b/r", "--storage-options",
                  '{"key": "AKIA123", "secret": "s3cr3t", "anon": false, "client_kwargs": {"region_name": "x"}}'])
    assert "AKIA123" not in line and "s3cr3t" not in line
    assert '"key": "***"' in line and '"anon": false' in line and '"region_name": "x"' in line


def test_slurm_job_script_has_the_flags_it_needs():
    """No Slurm here: the example job script is checked for what a two-stage multi-node run needs."""
    text = (REPO / "examples" / "slurm" / "train.sbatch").read_text()
    for flag in (r"#SBATCH --nodes=\d+", r"#SBATCH --ntasks-per-node=1\b", r"#SBATCH --gpus-per-node=\d+"):
        assert re.search(rf"(?m)^{flag}", text), flag
    (launch,) = re.findall(r"(?ms)^srun .*?[^\\]$", text)
    launch = " ".join(launch.replace("\\\n", " ").split())
    for part in ("srun torchrun", '--nnodes "$SLURM_NNODES"', '--nproc-per-node "$GPUS_PER_NODE"',
                 '--rdzv-id "$SLURM_JOB_ID"', "--rdzv-backend c10d", '--rdzv-endpoint "$head:$PORT"',
                 '-m spar_pipeline.train -- --run "$RUN"'):
        assert part in launch, part
    assert re.search(r"(?m)^head=\$\(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" \| head -n ?1\)", text)
    extract = (REPO / "examples" / "slurm" / "extract.py").read_text()
    for part in ("from dask_jobqueue import SLURMCluster", "cluster.scale(", "--resources", "GPU=1",
                 '"extract"', '"--scheduler"', "cluster.scheduler_address"):
        assert part in extract, part
    compile(extract, "extract.py", "exec")  # it parses (dask-jobqueue itself is an optional extra, not needed here)
