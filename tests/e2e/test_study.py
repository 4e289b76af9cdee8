"""One run, many teachers and students (issue 18, the model): a second teacher never touches the first,
students freeze their settings and resume, a killed student resumes, ``--images`` subsets nest,
``[[students]]`` seeds expand through ``run``, and a run of the older layout is refused and migrated.

Everything runs for real on tiny-cpu (12 small images, the real stages, a real SIGKILL), through the
CLI in this process where the command line is what is tested.
"""

from __future__ import annotations

import logging
import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spar_pipeline import augment, extract, heldout, ingest, manifest, split, train, weights
from spar_pipeline.backbones import build
from spar_pipeline.checkpoint import Checkpointer
from spar_pipeline.cli import app
from spar_pipeline.errors import RunError, TrainError
from spar_pipeline.migrate import migrate
from spar_pipeline.mini.sa1b_writer import make_sa1b_source
from spar_pipeline.run import Run

from _extracted import tiny_recipe
from faults._support import kill_group, start, wait_until

IMAGES = 12


def _recipe(tmp: Path) -> Path:
    """tiny-cpu sized for 12 small images: 1 epoch, about 3 held out, a step checkpoint every 2 steps."""
    return tiny_recipe(tmp / "study.toml", epochs="1", holdout_fraction="0.25", checkpoint_every="2",
                       loader_workers="0", images_per_task="6")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """A run with 12 images through ingest, augment and the default teacher's extract."""
    tmp = tmp_path_factory.mktemp("study")
    tars = make_sa1b_source(tmp / "src", n_tars=2, per_tar=IMAGES // 2, size=(96, 64), seed=4)
    run = Run(str(tmp / "base"))
    run.resolve_recipe(str(_recipe(tmp)))
    ingest.run(run, [str(t) for t in tars])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    return dict(run=tmp / "base", recipe=tmp / "study.toml", tars=[str(t) for t in tars])


def _copy(prepared: dict, dst: Path) -> Run:
    shutil.copytree(prepared["run"], dst)
    return Run(str(dst))


def cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, list(args), prog_name="spar-pipeline")
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
    return result


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _toml(run: Run, *parts: str) -> dict:
    return tomllib.loads(Path(run.path(*parts)).read_text())


def test_two_teachers_and_three_students_on_one_run_without_reextraction(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    first = Path(run.path("teachers", "default"))
    before = _snapshot(first)
    assert any(k.startswith("features.zarr/maps/") for k in before) and any(k.startswith("manifests/extract/")
                                                                            for k in before)
    out = cli("extract", "--run", run.url, "--teacher", "s16", "--stride", "16", "--workers", "1")
    assert "'done': 12" in out.output
    assert extract.run(run, workers=1, progress=False)["done"] == 0  # the default teacher: nothing pending
    cli("train", "--run", run.url)
    cli("train", "--run", run.url, "--student", "blk1", "--trainable", "blk_-1")
    out = cli("train", "--run", run.url, "--student", "on-s16", "--teacher", "s16")
    assert "students/on-s16/checkpoints/best.safetensors" in out.output
    assert _snapshot(first) == before  # the first teacher's store, manifest and teacher.toml: byte-identical

    assert run.teachers() == ["default", "s16"] and run.students() == ["blk1", "default", "on-s16"]
    t0, t1 = _toml(run, "teachers", "default", "teacher.toml"), _toml(run, "teachers", "s16", "teacher.toml")
    assert (t0["stride"], t1["stride"]) == (24, 16) and t0["window"] == t1["window"] == 64
    assert (t0["fingerprint"]["stride"], t1["fingerprint"]["stride"]) == (24, 16)
    assert t0["fingerprint"]["digest"] != t1["fingerprint"]["digest"]
    ids = [sorted(manifest.read_manifest(run.teacher(t), "extract")["image_id"].to_pylist()) for t in run.teachers()]
    assert ids[0] == ids[1] and len(ids[1]) == IMAGES
    settings = {name: run.student(name).settings for name in run.students()}
    assert {n: s["teacher"] for n, s in settings.items()} == {"blk1": "default", "default": "default",
                                                              "on-s16": "s16"}
    assert settings["blk1"]["trainable"] == "blk_-1" and settings["default"]["trainable"] == "blk_-1,blk_-2"
    model = build("tiny-siglip")
    assert settings["blk1"]["trainable_params"] == model.set_trainable("blk_-1")
    assert settings["default"]["trainable_params"] == model.set_trainable("blk_-1,blk_-2")
    assert {s["images"] for s in settings.values()} == {len(split.training_items(run)[0])}
    for name in run.students():  # each its own train manifest and best weights
        rows = manifest.read_manifest(run.student(name), "train").to_pylist()
        assert [r["epoch"] for r in rows] == [0]
        assert weights.student_checkpoint(run, name) == ("students", name, "checkpoints", "best.safetensors")
    held = [[it.image_id for it in split.training_items(run, t)[1]] for t in ("default", "s16")]
    assert held[0] == held[1] and len(held[0]) >= 1  # one held-out slice for every student: val_mse compare
    a, b = (manifest.read_manifest(run.student(n), "train").to_pylist()[0]["val_mse"] for n in ("default", "on-s16"))
    assert a != b  # the s16 student learned other maps
    held_mse = dict(heldout.heldout_mse(run, ["default", "on-s16"]))  # each against the teacher it learned
    assert held_mse["default"] == pytest.approx(a, rel=1e-4) and held_mse["on-s16"] == pytest.approx(b, rel=1e-4)


def test_student_drift_refused_naming_the_key_and_epochs_may_grow(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    cli("train", "--run", run.url, "--student", "a", "--lr", "1e-4", "--epochs", "1")
    folder = Path(run.student("a").path())
    before = _snapshot(folder)
    out = cli("train", "--run", run.url, "--student", "a", "--lr", "2e-4", ok=False).output
    assert len(out.strip().splitlines()) == 1 and "student a was frozen with lr=0.0001" in out
    assert "asks lr=0.0002" in out and "nothing changed" in out
    out = cli("train", "--run", run.url, "--student", "a", "--trainable", "blk_-1", "--images", "4", ok=False).output
    n = len(split.training_items(run)[0])
    assert f"trainable='blk_-1,blk_-2', images={n}" in out and "asks trainable='blk_-1', images=4" in out
    assert _snapshot(folder) == before  # refused: nothing changed
    cli("train", "--run", run.url, "--student", "a", "--lr", "1e-4")  # the same settings: resumes (nothing left)
    assert _snapshot(folder) == before
    report = train.run(run, student="a", epochs=2, progress=False)  # epochs may grow: it trains further
    assert report["steps_this_run"] == report["step"] // 2 and run.student("a").settings["epochs"] == 2
    assert {k: v for k, v in run.student("a").settings.items() if k != "epochs"} == {
        k: v for k, v in tomllib.loads(before["student.toml"].decode()).items() if k != "epochs"}
    out = cli("train", "--run", run.url, "--student", "a", "--epochs", "1", ok=False).output
    assert "epochs=2" in out and "asks epochs=1 (epochs may only grow)" in out


def test_killed_student_resumes_from_its_last_checkpoint(prepared, tmp_path, caplog):
    run = _copy(prepared, tmp_path / "run")
    folder = run.student("k")
    steps = lambda: Checkpointer(folder, dict, every=2).entries()  # noqa: E731
    log = tmp_path / "train.log"
    proc = start(["train", "--run", run.url, "--student", "k", "--trainable", "blk_-1", "--epochs", "4",
                  "--seed", "7"], log=log)
    wait_until(lambda: bool(steps()), proc)
    assert kill_group(proc), f"train finished before the kill: {log.read_text()[-800:]}"
    done = manifest.read_manifest(folder, "train").num_rows
    assert done < 4 and steps()
    assert folder.settings["trainable"] == "blk_-1" and folder.settings["seed"] == 7  # frozen before the kill
    last = max(steps())
    with caplog.at_level(logging.INFO, logger="spar_pipeline.train"):
        report = train.run(run, student="k", progress=False)  # no options: the frozen settings
    assert f"resumed from step {last} " in caplog.text
    assert report["steps_this_run"] == report["step"] - last and report["step"] == 4 * report["train_images"]
    rows = sorted(manifest.read_manifest(folder, "train").to_pylist(), key=lambda r: r["epoch"])
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, (e + 1) * report["train_images"]) for e in range(4)]
    assert not run.exists("students", "default")  # the kill and the resume touched student k only


def test_images_subsets_nest_and_share_the_held_out_slice(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    full, held = split.training_items(run)
    subsets = {n: [it.image_id for it in split.training_items(run, images=n)[0]] for n in (3, 5, 7)}
    assert set(subsets[3]) < set(subsets[5]) < set(subsets[7]) < {it.image_id for it in full}  # nested
    assert all(split.training_items(run, images=n)[1] == held for n in subsets)  # the same held-out slice
    assert split.nested_subset([it.image_id for it in full], 5, seed=0) == subsets[5]  # seeded, the recipe's seed
    with pytest.raises(TrainError, match=f"--images 100: the training split holds {len(full)} images"):
        split.training_items(run, images=100)
    report = train.run(run, student="few", images=3, seed=1, epochs=1, progress=False)
    assert report["train_images"] == 3 and sorted(report["shares"][0]) == subsets[3]
    assert run.student("few").settings["images"] == 3 and report["val_images"] == len(held)


def test_recipe_students_with_seeds_through_run(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    study = tmp_path / "with-students.toml"
    study.write_text(prepared["recipe"].read_text() + '\n[[students]]\nname = "blk1"\ntrainable = "blk_-1"\n'
                     'epochs = 1\nseeds = [0, 1]\n')
    cli("run", *prepared["tars"], "--run", run.url, "--recipe", str(study))  # only the study lists differ: accepted
    assert run.students() == ["blk1-seed0", "blk1-seed1"]  # the listed students; no default
    frozen = tomllib.loads(Path(run.path("run.toml")).read_text())
    assert [s["name"] for s in frozen["students"]] == ["blk1-seed0", "blk1-seed1"]
    for seed in (0, 1):
        s = run.student(f"blk1-seed{seed}").settings
        assert (s["seed"], s["trainable"], s["epochs"]) == (seed, "blk_-1", 1)
    best = [Path(run.student(f"blk1-seed{s}").best_weights).read_bytes() for s in (0, 1)]
    assert best[0] != best[1]  # another seed, another epoch order, other weights
    parts = {n: sorted(Path(run.student(n).path("manifests", "train")).glob("*.parquet")) for n in run.students()}
    cli("run", *prepared["tars"], "--run", run.url)  # again, the frozen list: each resumes, none trains again
    assert {n: sorted(Path(run.student(n).path("manifests", "train")).glob("*.parquet")) for n in parts} == parts


def _to_older_layout(run: Run) -> None:
    """What the layout before named teachers and students looked like: one store, one student at the top."""
    root = Path(run.path())
    for new, old in (("teachers/default/features.zarr", "features.zarr"),
                     ("teachers/default/manifests/extract", "manifests/extract"),
                     ("students/default/checkpoints", "checkpoints"), ("students/default/manifests/train",
                                                                      "manifests/train")):
        (root / new).rename(root / old)
    fingerprint = tomllib.loads((root / "teachers/default/teacher.toml").read_text())["fingerprint"]
    data = tomllib.loads((root / "run.toml").read_text())
    import tomli_w

    (root / "run.toml").write_text(tomli_w.dumps({**data, "teacher": fingerprint}))
    shutil.rmtree(root / "teachers")
    shutil.rmtree(root / "students")


def test_older_layout_refused_then_migrated_locally_and_on_s3(prepared, tmp_path, s3_bucket):
    run = _copy(prepared, tmp_path / "run")
    train.run(run, progress=False)
    want_teacher, want_student = run.teacher().read_toml("teacher.toml"), run.student().settings
    _to_older_layout(run)
    old = tmp_path / "old"
    shutil.copytree(run.path(), old)
    out = cli("train", "--run", run.url, ok=False).output
    assert len(out.strip().splitlines()) == 1 and f"`spar-pipeline migrate --run {run.url}`" in out
    with pytest.raises(RunError, match="older layout"):
        weights.student_checkpoint(Run(run.url), "default")

    out = cli("migrate", "--run", run.url).output
    assert "features.zarr -> teachers/default/features.zarr" in out and "wrote students/default/student.toml" in out
    again = Run(run.url)
    assert again.legacy() == [] and not again.exists("features.zarr") and not again.exists("checkpoints")
    assert again.teacher().read_toml("teacher.toml") == want_teacher
    assert again.student().settings == want_student  # trainable, images, epochs, trainable_params recovered
    assert train.run(again, progress=False)["steps_this_run"] == 0  # resumes where it was: nothing left
    assert "'damaged': 0" in cli("verify", "--run", run.url).output
    assert "already in the current layout" in cli("migrate", "--run", run.url).output

    s3 = Run(f"{s3_bucket}/old")
    s3.fs.put(str(old) + "/", s3.path(), recursive=True)
    assert s3.legacy() == ["features.zarr", "checkpoints", "manifests/extract", "manifests/train"]
    migrate(s3)
    s3 = Run(s3.url)
    assert s3.legacy() == [] and s3.teachers() == ["default"] and s3.students() == ["default"]
    assert s3.student().settings == want_student and s3.teacher().read_toml("teacher.toml") == want_teacher
    local = _snapshot(Path(again.path("teachers", "default", "features.zarr")))
    moved = s3.fs.find(s3.path("teachers", "default", "features.zarr"))
    assert len(moved) == len(local) and s3.exists("students", "default", "checkpoints", "best.safetensors")
