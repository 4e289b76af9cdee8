"""The run folder: recipe frozen once, a different recipe refused naming the keys; it names where its
teachers' stores and students' folders live, lists them from their settings files, refuses the older
layout naming the migration, and URLs open with the storage options of ``fsutil.storage_options_for``."""

from __future__ import annotations

import tomllib

import pytest

from spar_pipeline.fsutil import storage_options_for
from spar_pipeline.recipe import load_recipe
from spar_pipeline.resources import stages_dir
from spar_pipeline.run import Run, RunError


def test_freeze_then_reuse(tmp_path):
    r = Run(str(tmp_path / "r"))
    with pytest.raises(RunError, match="--recipe tiny-cpu"):
        r.resolve_recipe(None)
    frozen = r.resolve_recipe("tiny-cpu")
    text = (tmp_path / "r" / "run.toml").read_text()
    assert tomllib.loads(text)["fingerprint"] == frozen.fingerprint
    assert Run(str(tmp_path / "r")).recipe == frozen
    assert Run(str(tmp_path / "r")).resolve_recipe("tiny-cpu") == frozen


def test_different_recipe_refused_and_nothing_changes(tmp_path):
    r = Run(str(tmp_path / "r"))
    r.resolve_recipe("tiny-cpu")
    before = (tmp_path / "r" / "run.toml").read_bytes()
    other = tmp_path / "other.toml"
    other.write_text((stages_dir() / "tiny-cpu.toml").read_text().replace("seed = 0", "seed = 5"))
    with pytest.raises(RunError, match=r"differs in: recipe\.seed"):
        Run(str(tmp_path / "r")).resolve_recipe(load_recipe(str(other)))
    assert (tmp_path / "r" / "run.toml").read_bytes() == before


def test_teacher_fingerprint_recorded_once(tmp_path):
    r = Run(str(tmp_path / "r"))
    r.resolve_recipe("tiny-cpu")
    t = r.teacher()
    t.freeze({"stride": 24}, {"backbone": "tiny-siglip", "weights": "aa"})
    t.freeze({"stride": 24}, {"backbone": "tiny-siglip", "weights": "aa"})
    assert Run(str(tmp_path / "r")).recipe.name == "tiny-cpu"
    assert tomllib.loads((tmp_path / "r" / "teachers" / "default" / "teacher.toml").read_text()) == {
        "stride": 24, "fingerprint": {"backbone": "tiny-siglip", "weights": "aa"}}
    with pytest.raises(RunError, match="teacher differs.*weights"):
        t.freeze({"stride": 24}, {"backbone": "tiny-siglip", "weights": "bb"})


def test_teachers_and_students_are_named_folders(tmp_path):
    r = Run(str(tmp_path / "r"))
    r.resolve_recipe("tiny-cpu")
    assert r.teachers() == [] and r.students() == []
    assert r.teacher("s16").store_url == str(tmp_path / "r" / "teachers" / "s16" / "features.zarr")
    s = r.student("blk1-seed0")
    assert s.checkpoints == str(tmp_path / "r" / "students" / "blk1-seed0" / "checkpoints")
    assert s.best_weights == s.checkpoints + "/best.safetensors"
    s.freeze({"lr": 1e-4, "epochs": 2, "teacher": "s16"}, trainable_params=7)
    r.teacher("s16").freeze({"stride": 16}, {"digest": "x"})
    assert r.students() == ["blk1-seed0"] and r.teachers() == ["s16"]  # only names with a settings file
    assert s.settings == {"lr": 1e-4, "epochs": 2, "teacher": "s16", "trainable_params": 7}
    for bad in ("a/b", "", "../x", "-x"):
        with pytest.raises(RunError, match="a name is 1 to 64 letters"):
            r.student(bad)
    with pytest.raises(RunError, match="evaluate's model labels"):
        r.student("pretrained")


def test_settings_frozen_once_drift_refused_epochs_may_grow(tmp_path):
    r = Run(str(tmp_path / "r"))
    s = r.student("a")
    base = {"lr": 1e-4, "epochs": 2, "trainable": "blk_-1"}
    assert s.plan(base, {"lr": 3e-4}) == {"lr": 3e-4, "epochs": 2, "trainable": "blk_-1"}
    s.freeze(s.plan(base, {"lr": 3e-4}))
    before = (tmp_path / "r" / "students" / "a" / "student.toml").read_bytes()
    assert s.plan(base, {}) == {"lr": 3e-4, "epochs": 2, "trainable": "blk_-1"}  # resume: the frozen ones
    with pytest.raises(RunError, match=r"frozen with lr=0.0003, trainable='blk_-1'.*asks lr=0.001, trainable='all'"):
        s.plan(base, {"lr": 1e-3, "trainable": "all", "epochs": 2})
    with pytest.raises(RunError, match=r"epochs=2 .*asks epochs=1 \(epochs may only grow\)"):
        s.plan(base, {"epochs": 1})
    assert (tmp_path / "r" / "students" / "a" / "student.toml").read_bytes() == before  # refused: nothing changed
    grown = s.plan(base, {"epochs": 5})
    s.freeze(grown)
    assert s.settings["epochs"] == 5 and s.settings["lr"] == 3e-4


def test_older_layout_refused_naming_the_migration(tmp_path):
    r = Run(str(tmp_path / "old"))
    r.resolve_recipe("tiny-cpu")
    (tmp_path / "old" / "features.zarr").mkdir()
    (tmp_path / "old" / "manifests" / "train").mkdir(parents=True)
    for call in (r.teacher, r.student, r.students, lambda: Run(r.url).store_url):
        with pytest.raises(RunError, match=r"older layout \(features.zarr, manifests/train at its top.*"
                                           r"`spar-pipeline migrate --run .*old`"):
            call()
    assert Run(str(tmp_path / "new")).legacy() == []


def test_s3_run_folder(s3_bucket):
    r = Run(f"{s3_bucket}/runs/one")
    r.resolve_recipe("tiny-cpu")
    assert Run(f"{s3_bucket}/runs/one").recipe.name == "tiny-cpu"
    r.write_bytes_atomic(b"hello", "reports", "x.txt")
    assert r.read_bytes("reports", "x.txt") == b"hello"


def test_store_url_is_inside_the_run(tmp_path, s3_bucket):
    from spar_pipeline.store import FeatureStore

    assert Run(str(tmp_path / "r")).store_url == str(tmp_path / "r" / "teachers" / "default" / "features.zarr")
    r = Run(f"{s3_bucket}/runs/two")
    FeatureStore.create(r.store_url, {"teacher": "t"}, storage_options=r.storage_options)
    assert r.exists("teachers", "default", "features.zarr", "zarr.json")  # opened with the run's S3 options
    assert FeatureStore.open(r.store_url, fingerprint={"teacher": "t"}).ids() == []


def test_storage_options_for_s3_and_local(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.example:9000")
    given = {"anon": False}
    s3 = storage_options_for("s3://b/run", given)
    assert s3["client_kwargs"] == {"endpoint_url": "http://s3.example:9000"} and s3["anon"] is False
    assert s3["use_listings_cache"] is False and s3["config_kwargs"]["retries"]["mode"] == "adaptive"
    assert given == {"anon": False}  # the caller's dict is left as it was
    own = storage_options_for("s3://b/run", {"client_kwargs": {"endpoint_url": "http://mine:1"}})
    assert own["client_kwargs"] == {"endpoint_url": "http://mine:1"}  # an explicit endpoint wins over the variable
    assert storage_options_for("/tmp/run", given) == given
