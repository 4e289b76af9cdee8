"""The command line as a user types it (subprocesses), including the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from spar_pipeline import manifest
from spar_pipeline.run import Run
from spar_pipeline.mini.sa1b_writer import make_sa1b_source

from _cli import cli  # tests/ is on sys.path (tests/conftest.py)


@pytest.mark.parametrize("command", ["ingest", "augment", "extract", "train", "evaluate", "run", "status", "verify",
                                     "segment", "features", "pca"])
def test_every_command_has_help_saying_what_it_does(command):
    text = cli(command, "--help").stdout
    assert "--run" in text
    if command in ("ingest", "augment", "extract", "train", "evaluate"):
        assert "Reads" in text and "Writes" in text and ("Resume" in text or "resume" in text)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    tars = make_sa1b_source(tmp / "src", n_tars=2, per_tar=3, seed=2)
    run = str(tmp / "run")
    cli("ingest", str(tmp / "src" / "*.tar"), "--run", run, "--recipe", "tiny-cpu")
    cli("augment", "--run", run)
    cli("extract", "--run", run, "--workers", "1")
    return run, tmp


def test_stages_and_status(cli_run):
    run, _ = cli_run
    out = cli("status", "--run", run).stdout
    for stage in ("ingest", "augment", "extract"):
        line = next(l for l in out.splitlines() if stage in l)
        assert " 6 " in line  # planned/done counts
    again = cli("extract", "--run", run, "--workers", "1")
    assert "nothing pending" in again.stderr + again.stdout or "'done': 0" in again.stdout


def test_other_recipe_refused_in_one_line(cli_run, tmp_path):
    run, _ = cli_run
    before = (Path(run) / "run.toml").read_bytes()
    out = cli("augment", "--run", run, "--recipe", "siglip2-b16", check=False)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "differs in:" in lines[0] and "extract.window" in lines[0]
    assert (Path(run) / "run.toml").read_bytes() == before


def test_bad_inputs_are_one_line(tmp_path):
    out = cli("augment", "--run", str(tmp_path / "new"), check=False)
    assert out.returncode == 2 and "--recipe tiny-cpu" in out.stderr and "Traceback" not in out.stderr
    out = cli("ingest", str(tmp_path / "missing.tar"), "--run", str(tmp_path / "r"), "--recipe", "tiny-cpu", check=False)
    assert out.returncode == 2 and "missing.tar" in out.stderr and "Traceback" not in out.stderr
    out = cli("status", "--run", str(tmp_path / "r"), "--storage-options", "{bad", check=False)
    assert out.returncode == 2 and "--storage-options: not valid JSON" in out.stderr
    out = cli("ingest", "x.tar", "--run", str(tmp_path / "r2"), "--recipe", "no-such", check=False)
    assert out.returncode == 2 and "available: " in out.stderr


def test_verify_and_repair_redo_a_damaged_map(cli_run):
    run, _ = cli_run
    assert "'damaged': 0" in cli("verify", "--run", run).stdout
    r = Run(run)
    victim = manifest.read_manifest(r.teacher(), "extract").to_pylist()[0]
    maps = Path(run) / "teachers" / "default" / "features.zarr" / "maps"
    chunk = next(p for p in (maps / str(victim["image_id"])).rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\0" * 16)
    bad = cli("verify", "--run", run, check=False)
    assert bad.returncode == 1 and f"image {victim['image_id']}" in bad.stderr
    cli("verify", "--run", run, "--repair")
    rows = {x["image_id"]: x for x in manifest.read_manifest(r.teacher(), "extract").to_pylist()}
    assert rows[victim["image_id"]]["status"] == "redo"
    cli("extract", "--run", run, "--workers", "1")
    assert "'damaged': 0" in cli("verify", "--run", run).stdout


def test_usage_errors_are_one_line_and_verbose_is_declared_once(tmp_path):
    out = cli("extract", "--run", str(tmp_path / "r"), "--workers", "0", check=False)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "'--workers': 0 is not allowed" in lines[0], out.stderr
    assert "--verbose" in cli("--help").stdout and "--verbose" not in cli("extract", "--help").stdout


def test_a_command_run_in_process_leaves_the_root_logger_as_it_was(tmp_path):
    # the command installs its own handler; one left behind would print every later library warning twice
    import logging

    from typer.testing import CliRunner

    from spar_pipeline.cli import app

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    result = CliRunner().invoke(app, ["augment", "--run", str(tmp_path / "never-made")])
    assert result.exit_code == 2
    assert (root.handlers, root.level) == before
