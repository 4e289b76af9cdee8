"""docker/: no engine here, so check that the images and compose agree with the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "spar_pipeline.cli"]


def _help(*cmd: str) -> str:
    out = subprocess.run([*CLI, *cmd, "--help"], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compose_client_command_is_a_real_cli_call():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"scheduler", "gpu-worker", "client", "objectstore"} <= set(services)
    cmd = services["client"]["command"]
    assert cmd[0] == "run"
    text = _help("run")
    for flag in (c for c in cmd if c.startswith("--")):
        assert flag in text, f"compose passes {flag}, which `spar-pipeline run` does not take"
    scheduler = cmd[cmd.index("--scheduler") + 1]
    port = scheduler.rsplit(":", 1)[1]
    assert services["scheduler"]["command"][services["scheduler"]["command"].index("--port") + 1] == port
    assert any(p.startswith(f"{port}:") for p in services["scheduler"]["ports"])
    worker = services["gpu-worker"]["command"]
    assert worker[0] == scheduler and "GPU=1" in worker
    assert services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["client"]["environment"]["AWS_ENDPOINT_URL"].startswith("http://objectstore:")
    assert any(v.endswith(":ro") for v in services["gpu-worker"]["volumes"])


def test_dockerfile_installs_with_the_constraints_and_starts_a_gpu_worker():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "--resources\", \"GPU=1\"" in text
    targets = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert targets == ["gpu", "cpu"]
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {s["build"]["target"] for s in compose["services"].values() if "build" in s} == {"gpu", "cpu"}
    for copied in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which is not in the repository"
