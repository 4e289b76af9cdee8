"""The run folder: recipe frozen once, a different recipe refused naming the keys; it names where its
store lives, and URLs open with the storage options of ``fsutil.storage_options_for``."""

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
    r.record_teacher({"backbone": "tiny-siglip", "weights": "aa"})
    r.record_teacher({"backbone": "tiny-siglip", "weights": "aa"})
    assert Run(str(tmp_path / "r")).recipe.name == "tiny-cpu"
    with pytest.raises(RunError, match="teacher differs.*weights"):
        r.record_teacher({"backbone": "tiny-siglip", "weights": "bb"})


def test_s3_run_folder(s3_bucket):
    r = Run(f"{s3_bucket}/runs/one")
    r.resolve_recipe("tiny-cpu")
    assert Run(f"{s3_bucket}/runs/one").recipe.name == "tiny-cpu"
    r.write_bytes_atomic(b"hello", "reports", "x.txt")
    assert r.read_bytes("reports", "x.txt") == b"hello"


def test_store_url_is_inside_the_run(tmp_path, s3_bucket):
    from spar_pipeline.store import FeatureStore

    assert Run(str(tmp_path / "r")).store_url == str(tmp_path / "r" / "features.zarr")
    r = Run(f"{s3_bucket}/runs/two")
    FeatureStore.create(r.store_url, {"teacher": "t"}, storage_options=r.storage_options)
    assert r.exists("features.zarr", "zarr.json")  # the store opened with the run's S3 options, in the run
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
