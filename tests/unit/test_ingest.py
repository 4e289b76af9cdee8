"""The ingest stage: one row per image, bad input rejected with a reason, resume and rerun."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from spar_pipeline import ingest, manifest
from spar_pipeline.imageio import decode_image
from spar_pipeline.recipe import load_recipe
from spar_pipeline.run import Run
from spar_pipeline.sources import SourceError, read_member
from spar_pipeline.mini.sa1b_writer import ACCEPTED_KINDS, REJECTED_KINDS, damage_tar, make_sa1b_source, make_sa1b_tar

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
SMALL = (48, 32)
COLUMNS = ["image_id", "source", "member", "offset", "size", "width", "height", "checksum", "status", "reason"]


def _recipe(workers: int = 1, max_id: int = 0):
    r = load_recipe("tiny-cpu")
    return dataclasses.replace(r, ingest=dataclasses.replace(r.ingest, workers=workers, max_id=max_id))


def _run(path: Path | str, workers: int = 1, max_id: int = 0) -> Run:
    run = Run(str(path))
    run.resolve_recipe(_recipe(workers, max_id))
    return run


def _rows(run: Run) -> dict[int, dict]:
    return {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}


def _parts(run: Run) -> list[str]:
    return sorted(run.fs.ls(run.path("manifests", "ingest"), detail=False))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spar_pipeline.ingest" and r.levelno >= logging.WARNING]


# ---- every kind of bad image: one rejected row with a reason, the rest unharmed ---------------
@pytest.mark.parametrize("kind", sorted(REJECTED_KINDS))
def test_bad_image_is_one_rejected_row(tmp_path, caplog, kind):
    tar = make_sa1b_tar(tmp_path / "sa_000001.tar", [1, 2, 3, 4], size=SMALL, bad={2: kind})
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tar)])
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[2]["status"] == "rejected" and REJECTED_KINDS[kind] in rows[2]["reason"]
    assert (rows[2]["width"], rows[2]["height"]) == (0, 0)
    assert all(rows[i]["status"] == "ok" and (rows[i]["width"], rows[i]["height"]) == SMALL for i in (1, 3, 4))
    assert report["ok"] == 3 and report["rejected"] == 1 and report["failed_tars"] == 0
    lines = [w for w in _warnings(caplog) if "sa_2.jpg" in w]
    assert len(lines) == 1 and lines[0].startswith("ingest: sa_000001.tar: sa_2.jpg: ") and rows[2]["reason"] in lines[0]


@pytest.mark.parametrize("kind", ACCEPTED_KINDS)
def test_odd_but_valid_image_is_accepted(tmp_path, caplog, kind):
    tar = make_sa1b_tar(tmp_path / "sa_000001.tar", [1, 2, 3], size=SMALL, bad={2: kind})
    run = _run(tmp_path / "run")
    ingest.run(run, [str(tar)])
    rows = _rows(run)
    assert [rows[i]["status"] for i in (1, 2, 3)] == ["ok"] * 3 and rows[2]["reason"] == ""
    # EXIF orientation 6 is applied (as the reference's OpenCV decode does): width and height swap
    assert (rows[2]["width"], rows[2]["height"]) == (SMALL[::-1] if kind == "exif_rotated" else SMALL)
    assert not _warnings(caplog)


def test_rows_point_at_the_member_bytes(tmp_path):
    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", [5, 1, 9], size=(64, 40), dot_prefix=True)
    run = _run(tmp_path / "run")
    ingest.run(run, [str(tar)])
    table = manifest.read_manifest(run, "ingest")
    assert table.column_names == COLUMNS
    for r in table.to_pylist():
        data = read_member(r["source"], r["offset"], r["size"])
        assert r["source"] == str(tar) and r["member"] == f"./sa_{r['image_id']}.jpg"
        assert r["checksum"] == hashlib.sha256(data).hexdigest()[:32]
        assert decode_image(data, 10**8).shape == (40, 64, 3) and (r["width"], r["height"]) == (64, 40)


# ---- damaged tars and odd members ----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "bad_checksum"])
def test_damaged_tar_keeps_what_came_before(tmp_path, caplog, damage):
    src = make_sa1b_source(tmp_path / "src", n_tars=2, per_tar=3, size=SMALL)
    damage_tar(src[0], damage, member=4)  # sa_3.jpg
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tmp_path / "src")])
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 4, 5, 6] and all(r["status"] == "ok" for r in rows.values())
    assert report["failed_tars"] == 0 and report["ok"] == 5
    lines = [w for w in _warnings(caplog) if "sa_000000.tar" in w]
    assert len(lines) == 1 and "keeping the 2 image(s) before it" in lines[0]
    assert ("truncated tar" if damage == "truncate" else "bad tar header checksum") in lines[0]
    assert manifest.read_manifest(run, "tars").num_rows == 2


def test_links_and_unsafe_members_are_ignored(tmp_path, caplog):
    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", [1, 2], size=SMALL, extras=True)
    run = _run(tmp_path / "run")
    ingest.run(run, [str(tar)])
    assert sorted(_rows(run)) == [1, 2]  # none of 999991..999995
    lines = _warnings(caplog)
    assert len(lines) == 1 and "'../sa_999991.jpg'" in lines[0] and "never followed or extracted" in lines[0]
    assert manifest.read_manifest(run, "tars").to_pylist()[0]["ignored"] == 7
    assert not (tmp_path / "sa_999991.jpg").exists() and not Path("/abs/sa_999992.jpg").exists()


def test_duplicate_ids_keep_the_first_in_source_order(tmp_path, caplog):
    make_sa1b_tar(tmp_path / "src" / "sa_000000.tar", [1, 2, 3, 3], size=SMALL)
    make_sa1b_tar(tmp_path / "src" / "sa_000001.tar", [2, 3, 4], size=(40, 30))
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tmp_path / "src" / "*.tar")])
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 3, 4] and report["duplicates"] == 2
    assert [Path(rows[i]["source"]).name for i in (1, 2, 3, 4)] == ["sa_000000.tar"] * 3 + ["sa_000001.tar"]
    assert manifest.read_manifest(run, "ingest").num_rows == 4
    lines = _warnings(caplog)
    assert sum("repeated member" in w and "sa_3.jpg" in w for w in lines) == 1
    across = [w for w in lines if "already ingested" in w]
    assert len(across) == 1 and "sa_000001.tar" in across[0] and "sa_000000.tar" in across[0]


def test_unreadable_tars_fail_alone(tmp_path, caplog):
    src = make_sa1b_source(tmp_path / "src", n_tars=2, per_tar=2, size=SMALL)
    (tmp_path / "src" / "sa_000005.tar").write_bytes(b"<html>403</html>" * 40)
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tmp_path / "src"), str(tmp_path / "gone.tar")])
    assert sorted(_rows(run)) == [1, 2, 3, 4]
    assert report["failed_tars"] == 2 and report["ok"] == 4 and report["tars"] == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and any("gone.tar" in e for e in errors) and any("sa_000005.tar: not a readable tar" in e for e in errors)
    assert sorted(Path(s).name for s in manifest.read_manifest(run, "tars")["source"].to_pylist()) == [p.name for p in src]
    with pytest.raises(SourceError, match="no SA-1B tars to ingest.*gone.tar"):
        ingest.run(run, [str(tmp_path / "gone.tar")])


# ---- where tars come from --------------------------------------------------------------------------
def test_links_file_with_file_urls(tmp_path):
    src = make_sa1b_source(tmp_path / "src", n_tars=3, per_tar=2, size=SMALL)
    links = tmp_path / "links.txt"
    links.write_text("file_name\tcdn_link\n" + "".join(f"{p.name}\tfile://{p}\n" for p in src))
    run = _run(tmp_path / "run")
    report = ingest.run(run, [], links=str(links), tars=["sa_000000", "sa_000002.tar"])
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 5, 6] and report["ok"] == 4
    assert {r["source"] for r in rows.values()} == {run.url_for("source", "sa_000000.tar"), run.url_for("source", "sa_000002.tar")}
    assert all(read_member(r["source"], r["offset"], r["size"])[:2] == b"\xff\xd8" for r in rows.values())


def test_s3_source_and_run(s3_bucket, tmp_path):
    import fsspec

    src = make_sa1b_source(tmp_path / "src", n_tars=2, per_tar=2, size=SMALL)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for p in src:
        fs.put(str(p), f"{s3_bucket}/sa1b/{p.name}")
    run = _run(f"{s3_bucket}/run")
    report = ingest.run(run, [f"{s3_bucket}/sa1b/*.tar"])
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 3, 4] and report["ok"] == 4
    r = rows[3]
    assert r["source"] == f"{s3_bucket}/sa1b/sa_000001.tar"
    assert hashlib.sha256(read_member(r["source"], r["offset"], r["size"])).hexdigest()[:32] == r["checksum"]
    assert ingest.run(run, [f"{s3_bucket}/sa1b"])["skipped_tars"] == 2


def test_worker_processes_give_the_same_rows(tmp_path):
    src = make_sa1b_source(tmp_path / "src", n_tars=3, per_tar=3, size=SMALL)
    make_sa1b_tar(tmp_path / "src" / "sa_000003.tar", [1, 10], size=SMALL, bad={10: "truncated"})
    one, two = _run(tmp_path / "one", workers=1), _run(tmp_path / "two", workers=2)
    ingest.run(one, [str(tmp_path / "src")])
    report = ingest.run(two, [str(tmp_path / "src")])
    assert report["ok"] == 9 and report["rejected"] == 1 and report["duplicates"] == 1 and len(src) == 3
    assert _rows(one) == _rows(two)


# ---- resume, rerun, limits ----------------------------------------------------------------------------
def test_rerun_writes_nothing_new(tmp_path):
    make_sa1b_source(tmp_path / "src", n_tars=2, per_tar=2, size=SMALL)
    run = _run(tmp_path / "run")
    ingest.run(run, [str(tmp_path / "src")])
    parts = _parts(run)
    report = ingest.run(run, [str(tmp_path / "src" / "*.tar")])
    assert report["skipped_tars"] == 2 and report["ok"] == report["rejected"] == 0
    assert _parts(run) == parts


def test_limit_and_max_id(tmp_path):
    make_sa1b_source(tmp_path / "src", n_tars=4, per_tar=3, size=SMALL)
    run = _run(tmp_path / "run")
    assert ingest.run(run, [str(tmp_path / "src")], limit=4)["ok"] == 6  # stops after the tar that crosses 4
    assert sorted(_rows(run)) == [1, 2, 3, 4, 5, 6]
    assert ingest.run(run, [str(tmp_path / "src")], limit=1)["ok"] == 3
    capped = _run(tmp_path / "capped", max_id=5)  # the recipe's max_id
    ingest.run(capped, [str(tmp_path / "src")])
    assert sorted(_rows(capped)) == [1, 2, 3, 4, 5]
    ingest.run(other := _run(tmp_path / "other"), [str(tmp_path / "src")], max_id=2)  # --max-id overrides
    assert sorted(_rows(other)) == [1, 2]


def test_crash_between_the_two_writes_is_redone_without_doubles(tmp_path, monkeypatch):
    make_sa1b_source(tmp_path / "src", n_tars=2, per_tar=2, size=SMALL)
    run = _run(tmp_path / "run")
    real = manifest.write_part

    def crash_on_marker(r, stage, rows, name=None):
        if stage == "tars":
            raise KeyboardInterrupt  # killed right after the tar's image rows were written
        return real(r, stage, rows, name)

    monkeypatch.setattr(manifest, "write_part", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        ingest.run(run, [str(tmp_path / "src")])
    monkeypatch.setattr(manifest, "write_part", real)
    assert sorted(_rows(run)) == [1, 2]
    report = ingest.run(run, [str(tmp_path / "src")])
    assert report["duplicates"] == 0 and report["ok"] == 2  # tar 0 redone silently, tar 1 new
    assert manifest.read_manifest(run, "ingest").num_rows == 4 and manifest.read_manifest(run, "tars").num_rows == 2


_CHILD = textwrap.dedent("""
    import sys, time
    from spar_pipeline import ingest
    from spar_pipeline.run import Run
    real = ingest.ingest_tar
    def slow(*a):
        time.sleep(0.4)
        return real(*a)
    ingest.ingest_tar = slow
    ingest.run(Run(sys.argv[1]), sys.argv[2:])
""")


def test_killed_ingest_rerun_matches_an_uninterrupted_one(tmp_path):
    src = make_sa1b_source(tmp_path / "src", n_tars=5, per_tar=3, size=SMALL)
    make_sa1b_tar(tmp_path / "src" / "sa_000005.tar", [3, 16], size=SMALL, bad={16: "corrupt"})
    clean = _run(tmp_path / "clean")
    ingest.run(clean, [str(tmp_path / "src")])
    killed = _run(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    log = tmp_path / "child.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, killed.url, str(tmp_path / "src")], env=env, stderr=err)
    parts = Path(killed.path("manifests", "tars"))
    deadline = time.monotonic() + 30
    while not (parts.exists() and any(parts.glob("part-*"))) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ingest ended before it was killed: {log.read_text()[-2000:]}"
    done = manifest.read_manifest(killed, "tars").num_rows
    assert 1 <= done < len(src) + 1
    ingest.run(killed, [str(tmp_path / "src")])
    key = lambda r: r["image_id"]  # noqa: E731
    assert sorted(_rows(killed).values(), key=key) == sorted(_rows(clean).values(), key=key)
    tars = lambda r: sorted(manifest.read_manifest(r, "tars").to_pylist(), key=lambda t: t["source"])  # noqa: E731
    assert tars(killed) == tars(clean)


# ---- image folders, WebDataset shards, benchmark train splits ----------------------------------------------
def test_folder_rows_are_read_in_place_and_reingesting_adds_nothing(tmp_path):
    from _image_sources import image_folder

    from spar_pipeline.ingest_rows import STABLE_BASE

    paths = image_folder(tmp_path / "photos", 5)
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tmp_path / "photos")])
    rows = list(_rows(run).values())
    assert report["ok"] == 5 and report["images"] == 5 and len(rows) == 5
    by_member = {r["member"]: r for r in rows}
    assert sorted(by_member) == ["img_000.jpg", "img_002.webp", "img_004.png", "sub/img_001.png", "sub/img_003.jpg"]
    for path in paths:
        r = by_member[str(path.relative_to(tmp_path / "photos"))]
        assert r["image_id"] >= STABLE_BASE and r["source"] == str(path) and r["offset"] == 0
        assert read_member(r["source"], r["offset"], r["size"]) == path.read_bytes()
        assert r["checksum"] == hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        assert (r["width"], r["height"]) == SMALL and r["status"] == "ok"
    parts = _parts(run)
    again = ingest.run(run, [str(tmp_path / "photos" / "**" / "*.*"), str(paths[0])])  # the same files, otherwise named
    assert again["ok"] == 0 and again["skipped_images"] == 5 and _parts(run) == parts
    image_folder(tmp_path / "photos", 2, start=5)  # the folder grows: only the new files are read
    assert ingest.run(run, [str(tmp_path / "photos")])["ok"] == 2 and len(_rows(run)) == 7


def test_sources_never_collide_and_sa1b_keeps_its_ids(tmp_path):
    from _image_sources import image_folder, wds_shard

    image_folder(tmp_path / "a", 3)
    image_folder(tmp_path / "b", 3)  # the same names and bytes elsewhere: other images
    wds_shard(tmp_path / "shards" / "shard-0.tar", 3)
    wds_shard(tmp_path / "shards" / "shard-1.tar", 3)  # the same keys in another shard
    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", [7, 8], size=SMALL)
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "shards"), str(tar)])
    rows = _rows(run)
    assert report["ok"] == 14 and report["duplicates"] == 0 and len(rows) == 14
    assert rows[7]["source"] == str(tar) and rows[8]["member"] == "sa_8.jpg"
    assert len({(r["source"], r["member"]) for r in rows.values()}) == 14


def test_webdataset_shards_group_samples_and_resume_like_sa1b_tars(tmp_path):
    from _image_sources import wds_shard

    shard = wds_shard(tmp_path / "shards" / "train-000.tar", 4)
    run = _run(tmp_path / "run")
    report = ingest.run(run, [str(tmp_path / "shards" / "*.tar")])
    rows = sorted(_rows(run).values(), key=lambda r: r["member"])
    assert report["ok"] == 4 and [r["member"] for r in rows] == ["000000.jpg", "000001.png", "000002.webp", "000003.jpg"]
    with tarfile.open(shard) as tf:
        truth = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert all(r["source"] == str(shard) and read_member(r["source"], r["offset"], r["size"]) == truth[r["member"]]
               for r in rows)
    assert manifest.read_manifest(run, "tars").to_pylist() == [dict(source=str(shard), images=4, ignored=8, error="")]
    assert ingest.run(run, [str(shard)])["skipped_tars"] == 1


def test_s3_folder_and_webdataset_shard(s3_bucket, tmp_path):
    import fsspec
    from _image_sources import image_folder, wds_shard

    image_folder(tmp_path / "imgs", 3)
    wds_shard(tmp_path / "wds" / "shard.tar", 2)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(str(tmp_path / "imgs"), f"{s3_bucket}/imgs", recursive=True)
    fs.put(str(tmp_path / "wds" / "shard.tar"), f"{s3_bucket}/wds/shard.tar")
    run = _run(f"{s3_bucket}/run")
    report = ingest.run(run, [f"{s3_bucket}/imgs", f"{s3_bucket}/wds/*.tar"])
    rows = _rows(run).values()
    assert report["ok"] == 5 and {r["source"].rsplit("/", 1)[0] for r in rows} == {
        f"{s3_bucket}/imgs", f"{s3_bucket}/imgs/sub", f"{s3_bucket}/wds"}
    assert all(hashlib.sha256(read_member(r["source"], r["offset"], r["size"])).hexdigest()[:32] == r["checksum"]
               for r in rows)
    assert ingest.run(run, [f"{s3_bucket}/imgs", f"{s3_bucket}/wds"])["ok"] == 0


def test_benchmark_train_splits_by_name(tmp_path):
    from _image_sources import train_splits

    from spar_pipeline.errors import DatasetError

    roots = train_splits(tmp_path / "data", n=2)
    run = _run(tmp_path / "run")
    report = ingest.run(run, [], datasets=[f"{name}={root}" for name, root in roots.items()])
    members = sorted(r["member"] for r in _rows(run).values())
    assert report["ok"] == 6 and [m.split("/")[0] for m in members] == ["ade20k"] * 2 + ["cityscapes"] * 2 + ["voc"] * 2
    assert "cityscapes/leftImg8bit/train/lindau/lindau_000001_000019_leftImg8bit.png" in members
    assert not any("annotations" in m or "gtFine" in m or "Segmentation" in m for m in members)  # labels unused
    for bad, why in [("coco=/x", "unknown benchmark 'coco'; choose from ade20k, cityscapes, voc"),
                     ("ade20k", "expected NAME=PATH"), (f"voc={tmp_path}", "no image folder at")]:
        with pytest.raises(DatasetError, match=why) as e:
            ingest.run(run, [], datasets=[bad])
        assert len(str(e.value).splitlines()) == 1


def test_sample_is_seeded_nested_and_stable_as_sources_grow(tmp_path):
    from _image_sources import image_folder

    image_folder(tmp_path / "photos", 24)
    make_sa1b_source(tmp_path / "sa", n_tars=2, per_tar=6, size=SMALL)
    sources = [str(tmp_path / "photos"), str(tmp_path / "sa")]

    def sample(name: str, n: int, seed: int, srcs=sources) -> set:
        run = _run(tmp_path / name)
        ingest.run(run, srcs, sample=n, seed=seed)
        return set(_rows(run))

    ten, twenty, other, every = sample("ten", 10, 1), sample("twenty", 20, 1), sample("other", 10, 2), sample("all", 99, 1)
    assert len(ten) == 10 and len(twenty) == 20 and ten < twenty and other != ten and len(every) == 36
    assert any(i < 100 for i in twenty) and any(i > 100 for i in twenty)  # SA-1B ids and stable ids in one ranking
    run = _run(tmp_path / "ten")
    assert ingest.run(run, sources, sample=10, seed=1)["ok"] == 0  # resume: the same sample, nothing new
    image_folder(tmp_path / "photos", 24, start=24)  # the collection doubles
    grown = sample("grown", 10, 1)
    assert len(grown) == 10 and grown & every <= ten  # an old image kept now was kept before
    report = ingest.run(run, sources, sample=10, seed=1)  # the grown sample into the first run: old rows stay
    assert report["ok"] == len(grown - ten) and set(_rows(run)) == ten | grown
    sa_taken = {i for i in _rows(run) if i < 100}
    assert ingest.run(run, [str(tmp_path / "sa")])["ok"] == 12 - len(sa_taken)  # sampled tars are not "done"


@pytest.mark.slow
def test_image_folder_through_augment_extract_and_train(tmp_path):
    """End to end on tiny-cpu: a folder of jpg/png/webp files becomes a trained student."""
    import math

    from _image_sources import image_folder

    from spar_pipeline import augment, extract, train

    image_folder(tmp_path / "photos", 6, size=(96, 64))
    r = load_recipe("tiny-cpu")
    r = dataclasses.replace(r, ingest=dataclasses.replace(r.ingest, workers=1),
                            train=dataclasses.replace(r.train, epochs=1, loader_workers=0, holdout_fraction=0.2))
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(r)
    assert ingest.run(run, [str(tmp_path / "photos")])["ok"] == 6
    assert augment.run(run)["done"] == 6
    assert extract.run(run, workers=1, progress=False)["done"] == 6
    report = train.run(run, processes=1, progress=False)
    assert report["train_images"] + report["val_images"] == 6 and report["steps_this_run"] == report["train_images"]
    assert math.isfinite(report["val_mse"]) and manifest.read_manifest(run.student(), "train").num_rows == 1


def test_command_line_takes_folders_datasets_and_a_sample(tmp_path):
    from _image_sources import image_folder, train_splits

    image_folder(tmp_path / "photos", 6)
    roots = train_splits(tmp_path / "data", n=2)
    exe = str(Path(sys.executable).with_name("spar-pipeline"))
    args = [exe, "ingest", str(tmp_path / "photos"), "--dataset", f"ade20k={roots['ade20k']}", "--dataset",
            f"voc={roots['voc']}", "--sample", "5", "--seed", "3", "--run", str(tmp_path / "run"), "--recipe", "tiny-cpu"]
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--sample 5 --seed 3: 5 of 10 candidate image(s)" in out.stderr
    assert len(_rows(Run(str(tmp_path / "run")))) == 5
    bad = subprocess.run(args[:2] + ["--dataset", "coco=/x", "--run", str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown benchmark 'coco'" in bad.stderr and "Traceback" not in bad.stderr
