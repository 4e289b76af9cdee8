"""Misuse through the real command line, as a new user would try it: one table, one answer each.

Every case must exit non-zero, print no traceback, say it in at most 3 lines, and name the reason
(the table's key word). The cases run in this process through typer's CliRunner on the real app
(the same entry point as ``spar-pipeline``), sharing one small ingested + augmented run; the two
that could hang (a pipe for a tar, a scheduler with no workers) run as subprocesses with a timeout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import dask
import distributed  # noqa: F401 - its config defaults exist before dask.config.set below (which would drop them)
import pytest
from PIL import Image
from typer.testing import CliRunner

from spar_pipeline.cli import app

from faults._support import copy_run

EXE = str(Path(sys.executable).with_name("spar-pipeline"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (name, argv, key word of the reason). Placeholders: {run} an ingested + augmented run (nothing
# extracted), {new} a fresh run folder per case, {src} the SA-1B source folder, {recipe} a small
# recipe, {img} a 300×300 PNG, {bad} bytes that are no image, {links} a links file, {missing} a path
# that does not exist, {port} a closed 127.0.0.1 port, {badtoml} / {widestride} broken recipes.
CASES: list[tuple[str, list[str], str]] = [
    # counts below 1, never "the default"
    ("workers_0", ["extract", "--run", "{run}", "--workers", "0"], "'--workers': 0 is not allowed"),
    ("workers_word", ["extract", "--run", "{run}", "--workers", "two"], "--workers"),
    ("window_batch_0", ["extract", "--run", "{run}", "--window-batch", "0"], "'--window-batch': 0"),
    ("extract_limit_0", ["extract", "--run", "{run}", "--limit", "0"], "'--limit': 0"),
    ("ingest_limit_negative", ["ingest", "{src}", "--run", "{new}", "--limit", "-3"], "'--limit': -3"),
    ("augment_limit_0", ["augment", "--run", "{run}", "--limit", "0"], "'--limit': 0"),
    ("epochs_0", ["train", "--run", "{run}", "--epochs", "0"], "'--epochs': 0"),
    ("processes_0", ["train", "--run", "{run}", "--processes", "0"], "'--processes': 0"),
    ("run_workers_0", ["run", "--run", "{new}", "--workers", "0"], "'--workers': 0"),
    ("eval_stride_0", ["evaluate", "--run", "{run}", "--mode", "sliding", "--stride", "0"], "'--stride': 0"),
    ("pca_stride_0", ["pca", "{img}", "--stride", "0"], "'--stride': 0"),
    ("pretrain_steps_0", ["pretrain-mini", "--steps", "0"], "'--steps': 0"),
    ("pretrain_minutes_0", ["pretrain-mini", "--minutes", "0"], "--minutes 0.0: must be > 0"),
    ("pretrain_batch_0", ["pretrain-mini", "--batch", "0"], "'--batch': 0"),
    ("max_id_negative", ["ingest", "{src}", "--run", "{new}", "--max-id", "-1"], "'--max-id': -1 is not allowed"),
    # closed sets, combinations
    ("eval_mode_unknown", ["evaluate", "--run", "{run}", "--mode", "fast"], "'fast' is not one of"),
    ("segment_mode_unknown", ["segment", "{img}", "--classes", "a", "--mode", "tiled"], "'tiled' is not one of"),
    ("eval_stride_without_sliding", ["evaluate", "--dataset", "voc21={src}", "--recipe", "{recipe}", "--stride", "8"],
     "applies to --mode sliding only"),
    ("segment_sliding_without_stride", ["segment", "{img}", "--classes", "a", "--mode", "sliding"], "needs --stride"),
    ("segment_stride_without_sliding", ["segment", "{img}", "--classes", "a", "--stride", "8"],
     "applies to --mode sliding only"),
    ("segment_stride_over_window", ["segment", "{img}", "--classes", "a", "--backbone", "tiny-siglip", "--mode",
                                    "sliding", "--stride", "200"], "stride 200 > window 64"),
    ("segment_logit_scale_0", ["segment", "{img}", "--classes", "a", "--logit-scale", "0"], "--logit-scale"),
    ("segment_prob_thd_over_1", ["segment", "{img}", "--classes", "a", "--prob-thd", "1.5"], "--prob-thd"),
    ("gpus_and_workers", ["extract", "--run", "{run}", "--gpus", "0", "--workers", "2"], "give one of them"),
    ("gpus_and_processes", ["train", "--run", "{run}", "--gpus", "0", "--processes", "2"], "give one of them"),
    ("workers_and_scheduler", ["run", "--run", "{new}", "--workers", "1", "--scheduler", "tcp://h:1"],
     "give one of them"),
    ("tars_without_links", ["ingest", "{src}", "--run", "{new}", "--tars", "sa_000000"], "give --links FILE too"),
    ("links_without_tars", ["ingest", "--run", "{new}", "--recipe", "{recipe}", "--links", "{links}"],
     "--links needs --tars"),
    ("links_empty_tars", ["ingest", "--run", "{new}", "--links", "{links}", "--tars", " , "],
     "expected comma-separated names"),
    # GPUs that this machine does not have (extract used to run quietly on CPU workers)
    ("extract_gpu_absent", ["extract", "--run", "{run}", "--gpus", "99"], "CUDA device(s)"),
    ("train_gpu_absent", ["train", "--run", "{run}", "--gpus", "99"], "CUDA device(s)"),
    ("run_gpu_absent", ["run", "--run", "{new}", "--gpus", "99"], "CUDA device(s)"),
    ("gpu_ids_not_numbers", ["extract", "--run", "{run}", "--gpus", "0,x"], "expected comma-separated GPU ids"),
    ("gpu_ids_repeated", ["extract", "--run", "{run}", "--gpus", "0,0"], "distinct GPU ids"),
    ("gpus_empty", ["train", "--run", "{run}", "--gpus", ""], "distinct GPU ids"),
    # empty or odd values
    ("classes_empty", ["segment", "{img}", "--classes", ""], "no class names"),
    ("classes_only_separators", ["segment", "{img}", "--classes", " ; , ;"], "no class names"),
    ("trainable_empty", ["train", "--run", "{run}", "--trainable", " "], "--trainable"),
    ("dataset_without_path", ["evaluate", "--dataset", "voc21", "--recipe", "{recipe}"], "expected NAME=PATH"),
    ("dataset_unknown", ["evaluate", "--dataset", "nope={src}", "--recipe", "{recipe}"],
     "no [evaluate.datasets.nope] settings"),
    ("dataset_missing_folder", ["evaluate", "--dataset", "voc21={missing}", "--recipe", "{recipe}"], "no image folder"),
    ("evaluate_nothing", ["evaluate"], "give --dataset NAME=PATH, or --run RUN"),
    ("storage_options_not_json", ["status", "--run", "{run}", "--storage-options", "{not json"], "not valid JSON"),
    ("storage_options_a_list", ["status", "--run", "{run}", "--storage-options", "[1]"], "expected a JSON object"),
    ("unknown_command", ["distill", "--run", "{run}"], "No such command"),
    ("unknown_option", ["extract", "--run", "{run}", "--bogus"], "No such option"),
    ("run_missing", ["augment"], "Missing option '--run'"),
    # missing, corrupt and odd inputs
    ("ingest_no_sources", ["ingest", "--run", "{new}", "--recipe", "{recipe}"], "--links FILE --tars NAMES"),
    ("ingest_missing_tar", ["ingest", "{missing}", "--run", "{new}", "--recipe", "{recipe}"], "no such tar"),
    ("links_file_missing", ["ingest", "--run", "{new}", "--recipe", "{recipe}", "--links", "{missing}", "--tars",
                            "sa_000000"], "not found"),
    ("links_without_row", ["ingest", "--run", "{new}", "--recipe", "{recipe}", "--links", "{links}", "--tars",
                           "sa_000042"], "no row for sa_000042"),
    ("recipe_unknown", ["ingest", "{src}", "--run", "{new}", "--recipe", "no-such-preset"], "available:"),
    ("recipe_not_toml", ["ingest", "{src}", "--run", "{new}", "--recipe", "{badtoml}"], "not valid TOML"),
    ("recipe_stride_over_window", ["ingest", "{src}", "--run", "{new}", "--recipe", "{widestride}"],
     "[extract].stride=100: must be ≤ [extract].window=64"),
    ("other_recipe_for_run", ["augment", "--run", "{run}", "--recipe", "siglip2-b16"], "differs in:"),
    ("segment_missing_image", ["segment", "{missing}", "--classes", "a"], "No such file"),
    ("segment_not_an_image", ["segment", "{bad}", "--classes", "a"], "not a readable image"),
    ("segment_backbone_unknown", ["segment", "{img}", "--classes", "a", "--backbone", "nope"], "unknown backbone"),
    ("status_no_run", ["status", "--run", "{new}"], "no run.toml yet"),
    ("verify_no_run", ["verify", "--run", "{new}"], "no run.toml yet"),
    # commands out of order
    ("augment_before_ingest", ["augment", "--run", "{new}", "--recipe", "{recipe}"], "nothing ingested yet"),
    ("extract_before_augment", ["extract", "--run", "{new}", "--recipe", "{recipe}", "--workers", "1"],
     "nothing augmented yet"),
    ("train_before_extract", ["train", "--run", "{run}"], "run `spar-pipeline extract` first"),
    ("heldout_mse_before_extract", ["evaluate", "--run", "{run}"], "run `spar-pipeline extract` first"),
    ("best_before_train", ["evaluate", "--run", "{run}", "--checkpoint", "best"], "no best checkpoint yet"),
    # endpoints that do not answer
    ("scheduler_not_an_address", ["extract", "--run", "{run}", "--scheduler", "nonsense"],
     "not a Dask scheduler address"),
    ("scheduler_http", ["run", "--run", "{new}", "--scheduler", "http://127.0.0.1:{port}"],
     "unknown address scheme 'http'"),
    ("scheduler_closed_port", ["extract", "--run", "{run}", "--scheduler", "tcp://127.0.0.1:{port}"],
     "no Dask scheduler answered"),
    ("object_store_closed_port", ["status", "--run", "s3://spar-nobucket/run", "--storage-options", "{s3closed}"],
     "127.0.0.1:{port}"),
]


def test_at_least_forty_cases():
    assert len(CASES) >= 40 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def world(tmp_path_factory, augmented, source, recipe) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("misuse")
    run = copy_run(augmented, tmp / "run")  # a copy: no case may change the suite's shared run
    Image.new("RGB", (300, 300), (120, 30, 200)).save(tmp / "image.png")
    (tmp / "bad.png").write_bytes(b"this is no image\n" * 8)
    (tmp / "links.txt").write_text(f"file_name\tcdn_link\nsa_000000.tar\tfile://{source}/sa_000000.tar\n")
    (tmp / "bad.toml").write_text("[extract\nwindow = 64\n")
    text = Path(recipe).read_text()
    (tmp / "wide.toml").write_text(text.replace("\nstride = 24", "\nstride = 100", 1))
    port = _closed_port()
    s3 = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    return dict(run=run.url, src=str(source), recipe=str(recipe), img=str(tmp / "image.png"), bad=str(tmp / "bad.png"),
                links=str(tmp / "links.txt"), missing=str(tmp / "missing.tar"), port=str(port),
                badtoml=str(tmp / "bad.toml"), widestride=str(tmp / "wide.toml"), s3closed=json.dumps(s3),
                tmp=str(tmp))


def _fill(argv: list[str], world: dict[str, str], new: str) -> list[str]:
    known = dict(world, new=new)
    return [re.sub(r"\{(\w+)\}", lambda m: known.get(m.group(1), m.group(0)), a) for a in argv]


def _check(code: int, output: str, want: str, exception: BaseException | None = None) -> None:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert code not in (0, None), output
    assert exception is None or isinstance(exception, SystemExit), repr(exception)  # nothing escaped the CLI
    assert "Traceback" not in output, output
    assert 1 <= len(lines) <= 3, output
    assert want in output, output


@pytest.mark.parametrize("name,argv,want", CASES, ids=[c[0] for c in CASES])
def test_misuse_is_one_clear_line(name, argv, want, world, tmp_path, monkeypatch):
    # log lines unwrapped: the count is of lines, not of terminal rows. The CLI's console read COLUMNS when it was
    # first imported, in whichever test of this process came first (under pytest-xdist, not always this file's)
    from spar_pipeline.cli import common

    monkeypatch.setattr(common.console, "width", 400)
    want = want.format(port=world["port"]) if "{port}" in want else want
    args = _fill(argv, world, str(tmp_path / "new"))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(app, args, prog_name="spar-pipeline")
    _check(result.exit_code, result.output, want, result.exception)
    if name == "ingest_missing_tar":
        assert result.output.count("missing.tar") == 1, result.output  # said once, not logged and then failed on
    if name == "other_recipe_for_run":
        assert "siglip2" not in (Path(world["run"]) / "run.toml").read_text()  # refused, nothing changed


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="400", DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="5s")
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def test_a_pipe_for_a_tar_or_an_image_does_not_hang(world, tmp_path):
    fifo = tmp_path / "sa_000001.tar"
    os.mkfifo(fifo)  # nobody ever writes: a read would wait forever
    out = _cli(["ingest", str(fifo), "--run", str(tmp_path / "r"), "--recipe", world["recipe"]])
    _check(out.returncode, out.stdout + out.stderr, "not a regular file")
    out = _cli(["segment", str(fifo), "--classes", "a", "--backbone", "tiny-siglip"])
    _check(out.returncode, out.stdout + out.stderr, "not a regular file")


def test_a_scheduler_without_workers_does_not_hang(world):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=":0") as cluster:  # None would take 8787, maybe another test's
        out = _cli(["extract", "--run", world["run"], "--scheduler", cluster.scheduler_address])
    _check(out.returncode, out.stdout + out.stderr, "has no workers")


def test_a_source_that_is_no_tar_fails_the_ingest(world, tmp_path):
    """Unreadable tars are skipped so that the others go on; when none could be read, ingest fails."""
    junk = tmp_path / "sa_000001.tar"
    junk.write_bytes(b"no tar here\n" * 100)
    result = CliRunner().invoke(app, ["ingest", str(junk), "--run", str(tmp_path / "r"), "--recipe", world["recipe"]])
    assert result.exit_code == 2 and "no source could be read" in result.output, result.output
