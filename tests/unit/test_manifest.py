"""Manifests: atomic parts, latest row wins, torn parts quarantined, contracts enforced."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spar_pipeline import manifest
from spar_pipeline.manifest import ManifestError, compact, pending, read_manifest, write_part
from spar_pipeline.run import Run


def ingest_row(i, status="ok", checksum="c"):
    return dict(image_id=i, source="t.tar", member=f"sa_{i}.jpg", offset=512 * i, size=10, width=30, height=20,
                checksum=checksum, status=status, reason="" if status == "ok" else "bad")


def aug_row(i, status="ok"):
    return dict(image_id=i, status=status, reason="", src_height=20, src_width=30, resized_height=20, resized_width=30,
                mode="full", crop_top=0, crop_left=0, crop_height=16, crop_width=16, flip=False, height=16, width=16)


@pytest.fixture
def run(tmp_path):
    r = Run(str(tmp_path / "run"))
    r.resolve_recipe("tiny-cpu")
    return r


def test_empty_manifest_has_schema(run):
    t = read_manifest(run.teacher(), "extract")
    assert t.num_rows == 0 and "checksum" in t.column_names


def test_latest_row_wins_and_pending(run):
    write_part(run, "ingest", [ingest_row(1), ingest_row(2), ingest_row(3, "rejected")])
    write_part(run, "ingest", [ingest_row(1, checksum="new")])
    t = read_manifest(run, "ingest")
    assert t.num_rows == 3
    assert {r["image_id"]: r["checksum"] for r in t.to_pylist()}[1] == "new"
    assert sorted(pending(t, read_manifest(run, "augment"))["image_id"].to_pylist()) == [1, 2]
    write_part(run, "augment", [aug_row(1), aug_row(2, "rejected")])
    assert pending(t, read_manifest(run, "augment")).num_rows == 0
    # a redo row (verify --repair) makes an image pending again
    write_part(run, "augment", [dict(aug_row(2), status="redo")])
    assert pending(t, read_manifest(run, "augment"))["image_id"].to_pylist() == [2]


def test_read_manifest_accepts_url_string(run):
    write_part(run, "ingest", [ingest_row(7)])
    assert read_manifest(run.url, "ingest")["image_id"].to_pylist() == [7]


def test_bad_rows_refused(run):
    with pytest.raises(ManifestError, match="missing"):
        write_part(run, "ingest", [{"image_id": 1}])
    with pytest.raises(ManifestError, match="unknown"):
        write_part(run, "ingest", [dict(ingest_row(1), extra=1)])


def test_torn_part_is_quarantined_not_counted(run, caplog):
    write_part(run, "ingest", [ingest_row(1)])
    name = write_part(run, "ingest", [ingest_row(2)])
    path = run.path("manifests", "ingest", name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    t = read_manifest(run, "ingest")
    assert t["image_id"].to_pylist() == [1]
    assert "unreadable part" in caplog.text
    assert run.fs.exists(run.path("manifests", "ingest", "quarantine", name))
    assert read_manifest(run, "ingest")["image_id"].to_pylist() == [1]


def test_unknown_version_and_wrong_columns_refused(run):
    sch = manifest.schema("ingest")
    t = sch.table([ingest_row(1)]).replace_schema_metadata({b"spar.stage": b"ingest", b"spar.schema_version": b"99"})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    run.write_bytes_atomic(buf.getvalue(), "manifests", "ingest", "part-00000000000000000001-x.parquet")
    with pytest.raises(ManifestError, match="v99, this spar-pipeline reads ingest v1"):
        read_manifest(run, "ingest")
    run.fs.rm(run.path("manifests", "ingest", "part-00000000000000000001-x.parquet"))
    bad = pa.table({"image_id": [1]}).replace_schema_metadata({b"spar.stage": b"ingest", b"spar.schema_version": b"1"})
    buf = io.BytesIO()
    pq.write_table(bad, buf)
    run.write_bytes_atomic(buf.getvalue(), "manifests", "ingest", "part-00000000000000000002-x.parquet")
    with pytest.raises(ManifestError, match="columns"):
        read_manifest(run, "ingest")


def test_compact_keeps_latest_rows(run):
    for i in range(20):
        write_part(run, "ingest", [ingest_row(i % 5, checksum=str(i))])
    before = read_manifest(run, "ingest").to_pylist()
    assert compact(run, "ingest", min_parts=4) == 20
    assert len(manifest._part_names(run, "ingest")) == 1
    assert sorted(read_manifest(run, "ingest").to_pylist(), key=lambda r: r["image_id"]) == sorted(
        before, key=lambda r: r["image_id"])
    write_part(run, "ingest", [ingest_row(0, checksum="later")])
    assert {r["image_id"]: r["checksum"] for r in read_manifest(run, "ingest").to_pylist()}[0] == "later"


def test_unknown_stage():
    with pytest.raises(ManifestError, match="known: augment"):
        manifest.schema("nope")
