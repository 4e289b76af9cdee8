"""Every kind of bad input in one table: what it is, the reason a user reads, and the proof.

Images: all kinds go into ONE tar with good images between them; one ingest and one augment
must give each its row (rejected with the table's reason, or accepted), and the good images
must come through untouched. Tars and runs: one small case per kind. The count is asserted.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
from pathlib import Path

import pytest

from spar_pipeline import augment, extract, ingest, manifest
from spar_pipeline.backbones import BackboneError, build
from spar_pipeline.manifest import ManifestError
from spar_pipeline.run import Run, RunError
from spar_pipeline.store import FeatureStore, StoreError
from spar_pipeline.mini.sa1b_writer import ACCEPTED_KINDS, REJECTED_KINDS, damage_tar, make_sa1b_tar, synthetic_image

from faults._support import copy_run

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# kind -> (stage that decides, expected reason; None: accepted)
IMAGE_KINDS: dict[str, tuple[str, str | None]] = {
    **{k: ("ingest", why) for k, why in REJECTED_KINDS.items()},
    **{k: ("ingest", None) for k in ACCEPTED_KINDS},
    "smaller_than_window": ("augment", None),  # 40×24: upscaled to the window, snapped to 16
    "huge_aspect_ratio": ("augment", "aspect ratio too extreme"),  # 2400×2
}
# kind -> the warning a user reads (ingest keeps going; the tar's good images are kept)
TAR_KINDS: dict[str, str] = {
    "truncated_tar": "truncated tar",
    "bad_header_checksum": "bad tar header checksum",
    "dotdot_member": "'../sa_900001.jpg'",
    "absolute_member": "'/etc/sa_900002.jpg'",
    "symlink_member": "'sa_900003.jpg'",
    "hardlink_member": "'sa_900004.jpg'",
    "duplicate_id_in_tar": "repeated member",
    "duplicate_id_across_tars": "already ingested",
    "not_a_tar": "not a readable tar",
}
# kind -> the error (one line) that refuses it
RUN_KINDS: dict[str, str] = {
    "different_recipe": "differs in:",
    "unknown_manifest_version": "this spar-pipeline reads ingest v1",
    "manifest_other_columns": "do not match the ingest v1 schema",
    "store_other_fingerprint": "holds maps of another teacher",
    "checkpoint_other_backbone": "does not fit backbone tiny-siglip",
    "teacher_inf": "overflows float16",  # NaN: tests/unit/test_extract.py::test_nan_maps_are_rejected_and_run_goes_on
}
SIZE = (48, 32)


def test_at_least_twenty_five_kinds():
    assert len(IMAGE_KINDS) + len(TAR_KINDS) + len(RUN_KINDS) >= 25  # 29 + 9 + 6 = 44
    assert len(set(IMAGE_KINDS) | set(TAR_KINDS) | set(RUN_KINDS)) == len(IMAGE_KINDS) + len(TAR_KINDS) + len(RUN_KINDS)


# ---- images: every kind in one tar, one run -------------------------------------------------------
def test_every_image_kind_in_one_tar(tmp_path, recipe, caplog):
    kinds = list(IMAGE_KINDS)
    ids = list(range(1, 2 * len(kinds) + 2))  # odd ids good, even ids one kind each
    bad = {2 * (i + 1): k for i, k in enumerate(kinds) if k in REJECTED_KINDS or k in ACCEPTED_KINDS}
    sizes = {2 * (i + 1): {"smaller_than_window": (40, 24), "huge_aspect_ratio": (2400, 2)}.get(k)
             for i, k in enumerate(kinds)}
    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", ids, size=lambda i: sizes.get(i) or SIZE, bad=bad)
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(str(recipe))
    with caplog.at_level(logging.WARNING):
        ingest.run(run, [str(tar)])
        augment.run(run)
    ing = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
    aug = {r["image_id"]: r for r in manifest.read_manifest(run, "augment").to_pylist()}
    assert sorted(ing) == ids
    for i, kind in enumerate(kinds):
        image_id = 2 * (i + 1)
        stage, why = IMAGE_KINDS[kind]
        row = ing[image_id] if stage == "ingest" else aug[image_id]
        if why is None:
            assert row["status"] == "ok" and aug[image_id]["status"] == "ok", (kind, row)
        else:
            assert row["status"] == "rejected" and why in row["reason"], (kind, row)
            lines = [m for m in caplog.messages if (f"sa_{image_id}.jpg" in m or f"image {image_id}:" in m)]
            assert len(lines) == 1 and row["reason"] in lines[0], (kind, lines)  # one line: what and where
    assert all(ing[i]["status"] == "ok" and aug[i]["status"] == "ok" for i in ids if i % 2)  # the rest unharmed
    assert aug[2 * (kinds.index("smaller_than_window") + 1)]["height"] >= run.recipe.extract.window


# ---- tars ---------------------------------------------------------------------------------------------
def _append(tar: Path, name: str, typ: bytes = tarfile.REGTYPE, link: str = "") -> None:
    with tarfile.open(tar, "a", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = typ, link
        data = b""
        if typ == tarfile.REGTYPE:
            buf = io.BytesIO()
            synthetic_image(1, (32, 32)).save(buf, "JPEG")
            data = buf.getvalue()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)


def _tar_case(kind: str, src: Path) -> None:
    main = make_sa1b_tar(src / "sa_000000.tar", [1, 2, 3], size=SIZE)
    if kind == "truncated_tar":
        damage_tar(main, "truncate", member=4)  # inside sa_3.jpg
    elif kind == "bad_header_checksum":
        damage_tar(main, "bad_checksum", member=4)
    elif kind == "dotdot_member":
        _append(main, "../sa_900001.jpg")
    elif kind == "absolute_member":
        _append(main, "/etc/sa_900002.jpg")
    elif kind == "symlink_member":
        _append(main, "sa_900003.jpg", tarfile.SYMTYPE, "/etc/passwd")
    elif kind == "hardlink_member":
        _append(main, "sa_900004.jpg", tarfile.LNKTYPE, "sa_1.jpg")
    elif kind == "duplicate_id_in_tar":
        make_sa1b_tar(main, [1, 2, 3, 3], size=SIZE)
    elif kind == "duplicate_id_across_tars":
        make_sa1b_tar(src / "sa_000001.tar", [3, 4], size=SIZE)
    elif kind == "not_a_tar":
        (src / "sa_000001.tar").write_bytes(b"<html>403 Forbidden</html>\n" * 30)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", list(TAR_KINDS))
def test_tar_kind(tmp_path, recipe, caplog, kind):
    src = tmp_path / "src"
    _tar_case(kind, src)
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(str(recipe))
    with caplog.at_level(logging.WARNING, logger="spar_pipeline.ingest"):
        ingest.run(run, [str(src)])
    rows = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
    kept = [1, 2] if kind in ("truncated_tar", "bad_header_checksum") else [1, 2, 3, 4] if kind.endswith(
        "across_tars") else [1, 2, 3]
    assert sorted(rows) == kept and all(r["status"] == "ok" for r in rows.values())
    lines = [m for m in caplog.messages if TAR_KINDS[kind] in m]
    assert len(lines) == 1 and "sa_00000" in lines[0], caplog.messages  # one line, naming the tar
    assert not any(tmp_path.rglob("sa_9000*")) and not Path("/etc/sa_900002.jpg").exists()  # nothing extracted


# ---- runs ---------------------------------------------------------------------------------------------
def _overflowing_teacher(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    b = build("tiny-siglip")
    state = {k: v.clone().contiguous() for k, v in b.state_dict().items()}
    for k in state:
        if "attn_pool.proj" in k:
            state[k] *= 1e7  # finite in float32, far past float16's 65504
    path = tmp_path / "overflow.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_run_kind(tmp_path, augmented, caplog, kind):
    run = copy_run(augmented, tmp_path / "run")
    want = RUN_KINDS[kind]
    if kind == "different_recipe":
        with pytest.raises(RunError, match=want) as e:
            run.resolve_recipe("siglip2-b16")
    elif kind in ("unknown_manifest_version", "manifest_other_columns"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = manifest.read_manifest(run, "ingest")
        if kind == "manifest_other_columns":
            table = table.drop_columns(["reason"])
        version = b"99" if kind == "unknown_manifest_version" else b"1"
        table = table.replace_schema_metadata({b"spar.stage": b"ingest", b"spar.schema_version": version})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        run.write_bytes_atomic(buf.getvalue().to_pybytes(), "manifests", "ingest", "part-99999999999999999999-x.parquet")
        with pytest.raises(ManifestError, match=want) as e:
            augment.run(run)
        assert "part-99999999999999999999-x.parquet" in str(e.value)  # names the file
    elif kind == "store_other_fingerprint":
        FeatureStore.create(run.teacher().store_url, {"backbone": "tiny-clip", "digest": "0123"})
        with pytest.raises(StoreError, match=want) as e:
            extract.run(run, workers=1, progress=False)
        assert manifest.read_manifest(run.teacher(), "extract").num_rows == 0
    elif kind == "checkpoint_other_backbone":
        from safetensors.torch import save_file

        other = tmp_path / "tiny-clip.safetensors"
        save_file({k: v.contiguous() for k, v in build("tiny-clip").state_dict().items()}, str(other))
        with pytest.raises(BackboneError, match=want) as e:
            build("tiny-siglip", checkpoint=str(other))
        assert str(other) in str(e.value)
    elif kind == "teacher_inf":
        ckpt = _overflowing_teacher(tmp_path)
        r = run.recipe
        rec = dataclasses.replace(r, recipe=dataclasses.replace(r.recipe, checkpoint=str(ckpt)))
        run = Run(str(tmp_path / "inf"))
        run.resolve_recipe(rec)
        for stage in ("ingest", "augment", "tars"):
            manifest.write_part(run, stage, manifest.read_manifest(Run(str(tmp_path / "run")), stage))
        b = build("tiny-siglip", checkpoint=str(ckpt))
        fp = extract.teacher_fingerprint(run, b.weights_digest, b.patch_size)
        FeatureStore.create(run.teacher().store_url, fp)
        spec = extract.ExtractSpec(run.url, {}, "tiny-siglip", str(ckpt), r.extract, r.ingest.max_pixels, fp)
        items = extract.plan(run)[:3]
        with caplog.at_level(logging.WARNING, logger="spar_pipeline.extract"):
            rep = extract.extract_batch(spec, items)
        assert sorted(m for m in caplog.messages if want in m) == sorted(
            f"image {i['image_id']}: teacher map {want}; rejected" for i in items)
        rows = manifest.read_manifest(run.teacher(), "extract").to_pylist()
        assert rep["rejected"] == 3 and len(rows) == 3
        assert all(x["status"] == "rejected" and want in x["reason"] for x in rows), rows
        assert not any(FeatureStore.open(run.teacher().store_url).exists(i["image_id"]) for i in items)
        return
    assert len(str(e.value).splitlines()) == 1  # one clear line


# ---- image folders and WebDataset shards --------------------------------------------------------------
# kind -> the reason a user reads, once, naming the file or sample; the row is rejected (a repeated key:
# the first sample is kept), the other images come through
SOURCE_KINDS: dict[str, str] = {
    "broken_link_in_folder": "not a regular file",
    "fifo_in_folder": "not a regular file",  # never opened: a read would block
    "garbage_file_in_folder": "not an image",
    "webdataset_sample_without_image": "sample has no jpg/jpeg/png/webp member (000009.cls, 000009.txt)",
    "webdataset_repeated_key": "repeated sample keys",
    "file_gone_before_extract": "gone or unreadable since ingest",
}


def test_source_kinds_are_new_kinds():
    assert len(SOURCE_KINDS) == 6 and not set(SOURCE_KINDS) & (set(IMAGE_KINDS) | set(TAR_KINDS) | set(RUN_KINDS))


def _source_case(kind: str, src: Path) -> tuple[str, str]:
    """Writes the case under ``src``; returns (the SOURCE to ingest, the name the line must carry)."""
    import os

    from _image_sources import image_bytes, image_folder, wds_shard, wds_tar

    if kind.startswith("webdataset"):
        shard = wds_shard(src / "shard-000000.tar", 3)
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        samples = [(k, {e: members[f"{k}.{e}"] for e in exts}) for k, exts in
                   [("000000", ["jpg", "cls"]), ("000001", ["png", "cls"]), ("000002", ["webp", "cls"])]]
        if kind == "webdataset_sample_without_image":
            samples.insert(1, ("000009", {"cls": b"1", "txt": b"no picture"}))
        else:
            samples.append(("000001", {"jpg": image_bytes(99)}))  # the key again, after another sample
        wds_tar(shard, samples)
        return str(src), "shard-000000.tar"
    image_folder(src, 3)
    bad = src / "sub" / "bad.jpg"
    if kind == "broken_link_in_folder":
        bad.symlink_to(src / "nowhere.jpg")
    elif kind == "fifo_in_folder":
        os.mkfifo(bad)
    elif kind in ("garbage_file_in_folder", "file_gone_before_extract"):
        bad.write_bytes(b"<html>403</html>" if kind.startswith("garbage") else image_bytes(5))
    else:
        raise AssertionError(kind)
    return str(src), str(bad)


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k.endswith("before_extract") else k
                                  for k in SOURCE_KINDS])
def test_source_kind(tmp_path, recipe, caplog, capfd, kind):
    source, name = _source_case(kind, tmp_path / "src")
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(str(recipe))
    want = SOURCE_KINDS[kind]
    with caplog.at_level(logging.WARNING):
        report = ingest.run(run, [source])
        if kind == "file_gone_before_extract":
            augment.run(run)
            Path(name).unlink()
            extract.run(run, workers=1, progress=False)
    stage = "extract" if kind == "file_gone_before_extract" else "ingest"
    rows = manifest.read_manifest(run.teacher() if stage == "extract" else run, stage).to_pylist()
    bad = [r for r in rows if r["status"] != "ok"]
    if kind == "webdataset_repeated_key":
        assert not bad and report["ok"] == 3  # the first sample of the key kept
        first = next(r for r in rows if r["member"].startswith("000001."))
        assert first["member"] == "000001.png"
    else:
        assert len(bad) == 1 and want in bad[0]["reason"] and len(rows) == 4, rows  # rejected, the rest go on
        assert sum(r["status"] == "ok" for r in rows) == 3
    logged = caplog.messages + capfd.readouterr().err.splitlines()  # extract logs in its worker process
    lines = [m for m in logged if want in m]
    assert len(lines) == 1 and name in lines[0], logged  # one line, naming the file or shard
