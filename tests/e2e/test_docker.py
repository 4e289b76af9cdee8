"""docker/: no engine here, so check that the images and compose agree with the CLIs they call
(`spar-pipeline <cmd> --help`, `dask scheduler|worker --help`), with each other's ports and env,
and with the project's constraints."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "spar_pipeline.cli"]
DASK = str(Path(sys.executable).with_name("dask"))
STANDARD_AWS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"}


@cache
def _help(*cmd: str) -> str:
    dask = bool(cmd) and cmd[0] == "dask"
    exe, args = ([DASK], cmd[1:]) if dask else (CLI, cmd)
    out = subprocess.run([*exe, *args, "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": "", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@cache
def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]


@cache
def _dockerfile() -> dict[str, str]:
    """Stage name -> its text."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    parts = re.split(r"^(?=FROM )", text, flags=re.M)
    return {re.match(r"FROM \S+ AS (\w+)", p).group(1): p for p in parts if p.startswith("FROM ")}


def _json_list(stage: str, instruction: str) -> list[str]:
    m = re.search(rf"^{instruction} (\[.*\])$", _dockerfile()[stage], flags=re.M)
    assert m, f"Dockerfile stage {stage} has no {instruction} in exec form"
    return yaml.safe_load(m.group(1))


def _flags_known(cmd: list[str], help_text: str, who: str) -> None:
    for flag in (c for c in cmd if c.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{who} does not take {flag}"


def _value(cmd: list[str], flag: str) -> str:
    assert flag in cmd, f"{flag} missing from {cmd}"
    return cmd[cmd.index(flag) + 1]


def _port(addr: str) -> str:
    return addr.rsplit(":", 1)[1]


def _workers() -> dict[str, dict]:
    return {n: s for n, s in _compose().items() if n.startswith("gpu-worker")}


def test_client_runs_a_real_cli_command_against_the_scheduler():
    services = _compose()
    assert {"scheduler", "client", "objectstore", "bucket"} <= set(services) and _workers()
    cmd = services["client"]["command"]
    assert cmd[0] == "run" and "Commands" in _help() and re.search(r"\brun\b", _help())
    _flags_known(cmd, _help("run"), "`spar-pipeline run`")
    scheduler = urlparse(_value(cmd, "--scheduler"))
    assert scheduler.scheme == "tcp" and scheduler.hostname in services
    sched_cmd = services["scheduler"]["command"]
    assert _value(sched_cmd, "--port") == str(scheduler.port)
    assert f"{scheduler.port}:{scheduler.port}" in services["scheduler"]["ports"]
    # The source and the run live in the bucket the one-shot `bucket` service creates.
    bucket = re.search(r"mc mb --ignore-existing store/(\S+)", " ".join(services["bucket"]["entrypoint"])).group(1)
    source, run = cmd[1], _value(cmd, "--run")
    assert urlparse(source).netloc == urlparse(run).netloc == bucket and run.startswith("s3://")
    assert _value(cmd, "--recipe") in {p.stem for p in (ROOT / "stages").glob("*.toml")}
    deps = services["client"]["depends_on"]
    assert deps["bucket"]["condition"] == "service_completed_successfully"
    assert all(deps[w]["condition"] == "service_healthy" for w in _workers())


def test_scheduler_and_workers_use_real_dask_flags_and_agree_on_ports():
    services = _compose()
    sched = services["scheduler"]
    assert sched["entrypoint"] == ["dask", "scheduler"]
    _flags_known(sched["command"], _help("dask", "scheduler"), "`dask scheduler`")
    dashboard = _port(_value(sched["command"], "--dashboard-address"))
    assert f"{dashboard}:{dashboard}" in sched["ports"]
    assert f"localhost:{dashboard}/health" in " ".join(sched["healthcheck"]["test"])
    address = _value(services["client"]["command"], "--scheduler")
    devices = []
    for name, w in _workers().items():
        cmd = w["command"]
        assert cmd[0] == address, f"{name} joins {cmd[0]}, the client uses {address}"
        _flags_known(cmd, _help("dask", "worker"), "`dask worker`")
        assert _value(cmd, "--resources") == "GPU=1" and _value(cmd, "--nthreads") == "1"
        assert f"localhost:{_port(_value(cmd, '--dashboard-address'))}/health" in " ".join(w["healthcheck"]["test"])
        (dev,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and len(dev["device_ids"]) == 1
        devices += dev["device_ids"]
        assert w["build"]["target"] == "gpu"
    assert len(devices) == len(set(devices)), f"two workers reserve the same GPU: {devices}"


def test_every_service_gets_the_same_standard_aws_environment_pointing_at_the_store():
    services = _compose()
    assert "AWS_" in _help("run"), "the CLI no longer says it honours AWS_* variables"
    store = services["objectstore"]
    store_port = _port(_value(store["command"], "--address"))
    envs = {n: services[n]["environment"] for n in ("client", "bucket", *_workers())}
    for name, env in envs.items():
        aws = {k for k in env if k.startswith("AWS_")}
        assert aws <= STANDARD_AWS, f"{name}: non-standard variables {aws - STANDARD_AWS}"
        endpoint = urlparse(env["AWS_ENDPOINT_URL"])
        assert endpoint.hostname == "objectstore" and str(endpoint.port) == store_port
        assert env == envs["client"], f"{name} sees a different environment than the client"
    assert store["environment"]["MINIO_ROOT_USER"] == envs["client"]["AWS_ACCESS_KEY_ID"]
    assert store["environment"]["MINIO_ROOT_PASSWORD"] == envs["client"]["AWS_SECRET_ACCESS_KEY"]
    assert f"{store_port}:{store_port}" in store["ports"]
    assert all(":" in s["image"] and not s["image"].endswith(":latest") for n, s in services.items()
               if "build" not in s), "third-party images are pinned"


def test_hub_cache_is_mounted_read_only_where_the_images_look_for_it():
    services = _compose()
    homes = {re.search(r"HF_HOME=(\S+)", _dockerfile()[s]).group(1) for s in ("gpu", "cpu")}
    assert len(homes) == 1
    (home,) = homes
    for name in ("client", *_workers()):
        vols = [v for v in services[name]["volumes"] if v.split(":")[-2] == home]
        assert vols and all(v.endswith(":ro") for v in vols), f"{name}: hub cache not mounted read-only at {home}"
        assert services[name]["environment"]["HF_HUB_OFFLINE"] == "1"


def test_dockerfile_pins_torch_from_the_constraints_and_starts_a_gpu_worker():
    stages = _dockerfile()
    assert list(stages) == ["gpu", "cpu"]
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M))
    assert set(pins) == {"torch", "torchvision"}
    for name, text in stages.items():
        installs = re.findall(r"pip install[^\n&]*", text)
        assert installs and all("-c constraints.txt" in line for line in installs), name
    assert "download.pytorch.org/whl/cpu" not in stages["gpu"], "the GPU image must get the CUDA build of torch"
    assert "-c /opt/cluster-lock.txt" in stages["cpu"] and "pip freeze" in stages["gpu"]
    froms = {re.match(r"FROM (\S+)", t).group(1) for t in stages.values()}
    assert len(froms) == 1, f"client and workers must share one Python (pickled tasks): {froms}"
    # The gpu image is `dask worker` with the very arguments compose gives it.
    assert _json_list("gpu", "ENTRYPOINT") == ["dask", "worker"]
    _flags_known(_json_list("gpu", "CMD"), _help("dask", "worker"), "`dask worker`")
    assert all(w["command"] == _json_list("gpu", "CMD") for w in _workers().values())
    # The cpu image is the spar-pipeline console script (and `dask` for the scheduler).
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert _json_list("cpu", "ENTRYPOINT") == ["spar-pipeline"] and "spar-pipeline" in scripts
    assert {s["build"]["target"] for s in _compose().values() if "build" in s} == {"gpu", "cpu"}
    for text in stages.values():
        for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
            for path in copied.split():
                assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"


@pytest.mark.parametrize("cmd", ["ingest", "augment", "extract", "train", "status"])
def test_commands_the_readme_gives_for_many_machines_exist(cmd):
    """The README's many-machines recipe calls these with --run (and extract with --scheduler)."""
    text = _help(cmd)
    assert "--run" in text
    if cmd == "extract":
        assert "--scheduler" in text
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^### Many machines.*?(?=^##)", readme, flags=re.M | re.S).group(0)
    assert f"spar-pipeline {cmd}" in section
