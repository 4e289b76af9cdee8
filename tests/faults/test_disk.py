"""A full disk and unwritable paths: one clear error, no manifest row for work not written.

ENOSPC (and EROFS, EACCES) are injected at the one OS call every local write ends in, the
rename of a finished temporary file into place (``rename(2)`` can itself fail with ENOSPC);
everything above it (Run, manifest, FeatureStore, zarr) is real. A run folder under a
regular file is a real unwritable path, whatever user the tests run as.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from spar_pipeline import extract, ingest, manifest
from spar_pipeline.backbones import build
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore

from faults._support import copy_run, done_once


def _fail_renames(monkeypatch, code: int, where: str, after: int = 0) -> list[str]:
    """os.replace into a path containing ``where`` fails with ``code`` after ``after`` successes."""
    real, seen = os.replace, []

    def replace(src, dst, *a, **k):
        if where in str(dst):
            seen.append(str(dst))
            if len(seen) > after:
                raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".partial")]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_manifest_write_fails_mid_ingest(tmp_path, monkeypatch, source, augmented, code):
    clean = Run(str(augmented))
    run = copy_run(augmented, tmp_path / "run")
    for stage in ("ingest", "tars", "augment"):
        run.fs.rm(run.path("manifests", stage), recursive=True)
    _fail_renames(monkeypatch, code, "/manifests/", after=2)  # tar 0: rows + marker land, tar 1's rows do not
    with pytest.raises(OSError) as e:
        ingest.run(run, [str(source)])
    assert e.value.errno == code and "/manifests/ingest/" in str(e.value) and len(str(e.value).splitlines()) == 1
    monkeypatch.undo()
    rows = manifest.read_manifest(run, "ingest").to_pylist()
    assert {Path(r["source"]).name for r in rows} == {"sa_000000.tar"} and len(rows) == 3
    assert len(manifest.read_manifest(run, "tars")) == 1
    assert _leftovers(tmp_path / "run") == []
    ingest.run(run, [str(source)])  # space freed: the rerun finishes the rest
    assert done_once(run, "ingest", list(range(1, 13))) == {
        r["image_id"]: r for r in manifest.read_manifest(clean, "ingest").to_pylist()}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_map_write_fails_no_row_for_it(tmp_path, monkeypatch, augmented, code):
    """The extract unit of work (what a worker runs): a map that cannot be written gets no row."""
    run = copy_run(augmented, tmp_path / "run")
    r = run.recipe
    b = build(r.recipe.backbone)
    fp = extract.teacher_fingerprint(run, b.weights_digest, b.patch_size)
    FeatureStore.create(run.teacher().store_url, fp)
    spec = extract.ExtractSpec(run.url, {}, r.recipe.backbone, r.recipe.checkpoint, r.extract, r.ingest.max_pixels, fp)
    items = extract.plan(run)[:3]
    victim = items[1]["image_id"]
    _fail_renames(monkeypatch, code, f"/maps/{victim}/c/")
    with pytest.raises(OSError) as e:
        extract.extract_batch(spec, items)
    assert e.value.errno == code and f"maps/{victim}/c" in str(e.value) and len(str(e.value).splitlines()) == 1
    monkeypatch.undo()
    assert manifest.read_manifest(run.teacher(), "extract").num_rows == 0  # the batch's part is written after its maps
    store = FeatureStore.open(run.teacher().store_url)
    assert not store.exists(victim)
    with pytest.raises(KeyError):
        store.read(victim)
    assert _leftovers(tmp_path / "run") == []
    extract.extract_batch(spec, items)  # the retry (Dask's, or the rerun's) writes it
    rows = {x["image_id"]: x for x in manifest.read_manifest(run.teacher(), "extract").to_pylist()}
    assert sorted(rows) == sorted(i["image_id"] for i in items)
    assert store.verify(victim, (rows[victim]["grid_h"], rows[victim]["grid_w"], rows[victim]["dim"]),
                        rows[victim]["checksum"]) is None


def test_run_folder_under_a_file_is_one_clear_error(tmp_path, recipe):
    (tmp_path / "file").write_text("not a folder")
    run = Run(str(tmp_path / "file" / "run"))
    with pytest.raises(NotADirectoryError) as e:
        run.resolve_recipe(str(recipe))
    assert str(tmp_path / "file") in str(e.value) and len(str(e.value).splitlines()) == 1
    assert (tmp_path / "file").read_text() == "not a folder"
