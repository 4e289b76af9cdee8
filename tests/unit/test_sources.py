"""Tars read in place: member index, byte-range reads, damaged tars, SOURCE resolution."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from spar_pipeline import sources
from spar_pipeline.sources import (
    SourceError,
    TarIndex,
    index_tar,
    iter_tar,
    read_links,
    read_member,
    resolve_sources,
    show_url,
    tar_name,
)
from spar_pipeline.mini.sa1b_writer import damage_tar, make_sa1b_tar

SMALL = (48, 32)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


@pytest.mark.parametrize("dot_prefix", [False, True])
def test_index_gives_offsets_that_read_back_the_member_bytes(tmp_path, dot_prefix):
    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", [3, 1, 20], size=SMALL, dot_prefix=dot_prefix)
    index = TarIndex()
    found = list(index_tar(str(tar), index=index))
    prefix = "./" if dot_prefix else ""
    assert [(m.name, m.image_id, m.kind) for m in found] == [
        (f"{prefix}sa_{i}.{k}", i, k) for i in (3, 1, 20) for k in ("jpg", "json")
    ]
    truth = _members(tar)
    for m in found:
        assert read_member(str(tar), m.offset, m.size) == truth[m.name]
    assert index.error == "" and index.ignored == 0
    with_data = list(iter_tar(str(tar)))
    assert [m for m, _ in with_data] == found and all(d == truth[m.name] for m, d in with_data)


def test_links_devices_and_unsafe_names_are_ignored_and_counted(tmp_path):
    work = tmp_path / "deep" / "cwd"
    work.mkdir(parents=True)
    tar = make_sa1b_tar(work / "sa_000000.tar", [1, 2], size=SMALL, extras=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        index = TarIndex()
        found = [(m.name, m.image_id) for m, _ in iter_tar(str(tar), index=index)]
    finally:
        os.chdir(cwd)
    assert found == [("sa_1.jpg", 1), ("sa_1.json", 1), ("sa_2.jpg", 2), ("sa_2.json", 2)]
    assert index.ignored == 7  # directory, ../, /abs, symlink, hard link, device, notes.txt
    text = " ".join(index.suspicious)
    for bad in ("'../sa_999991.jpg'", "'/abs/sa_999992.jpg'", "link 'sa_999993.jpg'", "link 'sa_999994.jpg'",
                "device 'sa_999995.jpg'"):
        assert bad in text
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_truncated_tar_keeps_the_members_before_the_cut(tmp_path):
    tar = make_sa1b_tar(tmp_path / "t.tar", [1, 2, 3], size=SMALL)
    damage_tar(tar, "truncate", member=4)  # inside sa_3.jpg
    for walk in (lambda ix: [m for m, _ in iter_tar(str(tar), index=ix)], lambda ix: list(index_tar(str(tar), index=ix))):
        index = TarIndex()
        assert [m.name for m in walk(index)] == ["sa_1.jpg", "sa_1.json", "sa_2.jpg", "sa_2.json"]
        assert index.error.startswith("truncated tar: sa_3.jpg")


def test_bad_header_checksum_stops_the_walk_with_a_clear_error(tmp_path):
    tar = make_sa1b_tar(tmp_path / "t.tar", [1, 2, 3], size=SMALL)
    damage_tar(tar, "bad_checksum", member=2)  # sa_2.jpg's header
    index = TarIndex()
    assert [m.name for m in index_tar(str(tar), index=index)] == ["sa_1.jpg", "sa_1.json"]
    assert "bad tar header checksum at offset" in index.error


def test_partial_header_and_non_tars(tmp_path):
    tar = make_sa1b_tar(tmp_path / "t.tar", [1, 2], size=SMALL)
    with tarfile.open(tar) as tf:
        cut = tf.getmembers()[2].offset + 100  # inside sa_2.jpg's header
    tar.write_bytes(tar.read_bytes()[:cut])
    index = TarIndex()
    assert [m.name for m in index_tar(str(tar), index=index)] == ["sa_1.jpg", "sa_1.json"]
    assert "truncated tar: partial header" in index.error
    junk = tmp_path / "junk.tar"
    for content in (b"not a tar at all" * 64, b""):
        junk.write_bytes(content)
        index = TarIndex()
        assert list(index_tar(str(junk), index=index)) == [] and "not a readable tar" in index.error


def test_keep_skips_members_unread(tmp_path):
    tar = make_sa1b_tar(tmp_path / "t.tar", [1, 5, 9], size=SMALL)
    index = TarIndex()
    got = [m.image_id for m, _ in iter_tar(str(tar), index=index, keep=lambda i: i <= 5)]
    assert got == [1, 1, 5, 5] and index.filtered == 2


def test_filesystems_are_cached_per_protocol_and_options(tmp_path):
    a, _ = sources._fs(str(tmp_path / "x.tar"), None)
    b, path = sources._fs(str(tmp_path / "y.tar"), {})
    assert a is b and path == str(tmp_path / "y.tar")
    m, p = sources._fs("memory://bucket/z.tar", None)
    assert m is not a and p == "/bucket/z.tar"


def test_read_member_is_one_range_read(tmp_path, monkeypatch):
    tar = make_sa1b_tar(tmp_path / "t.tar", [1], size=SMALL)
    m = next(index_tar(str(tar)))
    fs, _ = sources._fs(str(tar), None)
    calls = []
    real = type(fs).cat_file
    monkeypatch.setattr(type(fs), "cat_file", lambda self, *a, **k: calls.append((a, k)) or real(self, *a, **k))
    data = read_member(str(tar), m.offset, m.size)
    assert len(calls) == 1 and calls[0][1] == {"start": m.offset, "end": m.offset + m.size}
    assert data[:2] == b"\xff\xd8"
    with pytest.raises(OSError, match="short read"):
        read_member(str(tar), tar.stat().st_size - 10, 100)


# ---- resolving SOURCE arguments ---------------------------------------------------------------
@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    for t in range(3):
        make_sa1b_tar(d / f"sa_{t:06d}.tar", [t + 1], size=SMALL)
    (d / "README.txt").write_text("not a tar")
    make_sa1b_tar(d / "nested" / "sa_000010.tar", [10], size=SMALL)
    return d


def test_resolve_paths_globs_and_folders(src, monkeypatch):
    monkeypatch.chdir(src.parent)
    names = lambda r: [Path(u).name for u in r.urls]  # noqa: E731
    r = resolve_sources(["src/sa_000001.tar"])
    assert r.urls == [str(src / "sa_000001.tar")] and r.failed == []  # absolute: any cwd reads it later
    assert names(resolve_sources(["src/*.tar"])) == ["sa_000000.tar", "sa_000001.tar", "sa_000002.tar"]
    assert names(resolve_sources([str(src)])) == ["sa_000000.tar", "sa_000001.tar", "sa_000002.tar", "sa_000010.tar"]
    assert names(resolve_sources([f"file://{src}/sa_000002.tar", "src/sa_000002.tar"])) == ["sa_000002.tar"]
    assert names(resolve_sources([str(src)], tars=["sa_000001", "2"])) == ["sa_000001.tar", "sa_000002.tar"]


def test_resolve_reports_what_gave_nothing(src, caplog):
    r = resolve_sources([str(src / "sa_000000.tar"), str(src / "gone.tar"), str(src / "*.tgz")])
    assert [Path(u).name for u in r.urls] == ["sa_000000.tar"]
    assert len(r.failed) == 2 and "gone.tar: no such tar" in r.failed[0] and "no .tar files match" in r.failed[1]
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]  # the caller says it, once
    r = resolve_sources([str(src)], tars=["sa_000007"])
    assert r.urls == [] and "sa_000007.tar: not among the given sources" in r.failed[0]


@pytest.mark.parametrize("spec,name", [("sa_000000", "sa_000000.tar"), ("sa_000012.tar", "sa_000012.tar"),
                                       ("7", "sa_000007.tar"), (" sa_000001 ", "sa_000001.tar")])
def test_tar_name_short_forms(spec, name):
    assert tar_name(spec) == name


@pytest.mark.parametrize("spec", ["../sa_000000.tar", "sa_x", "/etc/passwd", ""])
def test_tar_name_refuses_anything_else(spec):
    with pytest.raises(SourceError, match="not an SA-1B tar name"):
        tar_name(spec)


def _links(tmp_path: Path, rows: dict[str, str], header: bool = True) -> Path:
    path = tmp_path / "links.txt"
    lines = (["file_name\tcdn_link"] if header else []) + [f"{k}\t{v}" for k, v in rows.items()]
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize("header", [True, False])
def test_links_file_rows_are_fetched_through_fsspec(src, tmp_path, header):
    links = _links(tmp_path, {f"sa_{t:06d}.tar": f"file://{src}/sa_{t:06d}.tar" for t in range(3)}, header)
    assert set(read_links(str(links))) == {"sa_000000.tar", "sa_000001.tar", "sa_000002.tar"}
    dest = tmp_path / "run" / "source"
    r = resolve_sources([], links=str(links), tars=["sa_000000", "sa_000002.tar"], download_dir=str(dest))
    assert r.urls == [str(dest / "sa_000000.tar"), str(dest / "sa_000002.tar")]
    assert (dest / "sa_000002.tar").read_bytes() == (src / "sa_000002.tar").read_bytes()
    assert not list(dest.glob("*.part"))
    (src / "sa_000000.tar").unlink()  # fetched once: a second resolve reads the local copy
    assert resolve_sources([], links=str(links), tars=["0"], download_dir=str(dest)).urls == [str(dest / "sa_000000.tar")]


def test_links_file_errors_are_one_line(src, tmp_path):
    links = _links(tmp_path, {"sa_000000.tar": f"file://{src}/sa_000000.tar", "sa_000001.tar": f"file://{src}/nope.tar"})
    with pytest.raises(SourceError, match="--links needs --tars"):
        resolve_sources([], links=str(links))
    with pytest.raises(SourceError, match="no row for sa_000005.tar"):
        resolve_sources([], links=str(links), tars=["sa_000005"])
    with pytest.raises(SourceError, match="not found"):
        resolve_sources([], links=str(tmp_path / "missing.txt"), tars=["0"])
    r = resolve_sources([], links=str(links), tars=["0", "1"], download_dir=str(tmp_path / "dl"))
    assert [Path(u).name for u in r.urls] == ["sa_000000.tar"] and "sa_000001.tar: fetch from" in r.failed[0]


def test_signed_urls_are_never_shown():
    url = "https://scontent.xx.fbcdn.net/m1/v/t6/An_x.tar?_nc_gid&ccb=10-5&oh=00_SECRETSIG&oe=6A3B&_nc_sid=0fdd8b"
    assert show_url(url) == "https://scontent.xx.fbcdn.net/m1/v/t6/An_x.tar"
    assert "SECRET" not in show_url("s3://b/k.tar?X-Amz-Signature=SECRET")


def test_s3_tars_are_indexed_and_read_in_place(s3_bucket, tmp_path):
    import fsspec

    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", [1, 2], size=SMALL, dot_prefix=True)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(str(tar), f"{s3_bucket}/data/sa_000000.tar")
    url = f"{s3_bucket}/data/sa_000000.tar"
    assert resolve_sources([f"{s3_bucket}/data/*.tar"]).urls == [url]
    assert resolve_sources([f"{s3_bucket}/data"]).urls == [url]
    truth = _members(tar)
    found = list(index_tar(url))
    assert [m.name for m in found] == list(truth)
    assert all(read_member(url, m.offset, m.size) == truth[m.name] for m in found)


# ---- image files and WebDataset shards ---------------------------------------------------------
def test_folders_and_globs_find_images_recursively(tmp_path):
    from _image_sources import image_bytes

    d = tmp_path / "photos"
    for rel, data in {"a.jpg": image_bytes(1), "deep/er/b.PNG": image_bytes(2, ext="png"), "c.webp": b"x",
                      "._a.jpg": b"macos junk", "notes.txt": b"", "deep/sa_000001.tar": b""}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    (d / "gone.jpg").symlink_to(d / "nowhere.jpg")
    r = resolve_sources([str(d)])
    assert [(Path(u).name) for u in r.urls] == ["sa_000001.tar"] and r.failed == []
    assert [(f.member, f.regular) for f in r.images] == [
        ("a.jpg", True), ("c.webp", True), ("deep/er/b.PNG", True), ("gone.jpg", False)]
    assert r.images[0].url == str(d / "a.jpg") and r.images[0].size == len(image_bytes(1))
    glob = resolve_sources([str(d / "deep" / "**" / "*.PNG"), str(d / "a.jpg"), f"file://{d}/a.jpg"])
    assert [(f.url, f.member) for f in glob.images] == [(str(d / "a.jpg"), "a.jpg"),
                                                        (str(d / "deep/er/b.PNG"), "er/b.PNG")]
    assert "no .tar files match" in resolve_sources([str(d / "*.gif")]).failed[0]


def test_webdataset_members_split_into_key_and_extension(tmp_path):
    from _image_sources import wds_tar

    from spar_pipeline.wds import is_sa1b_tar, iter_wds

    tar = wds_tar(tmp_path / "shard-000000.tar", [("./k1", {"jpg": b"J1", "cls": b"3"}),
                                                  ("dir/k.2", {"seg.png": b"S"}), ("../evil", {"jpg": b"E"})])
    with tarfile.open(tar, "a") as tf:
        info = tarfile.TarInfo("README")
        tf.addfile(info, None)
    index = TarIndex()
    got = [(m.key, m.ext, d) for m, d in iter_wds(str(tar), index=index)]
    assert got == [("k1", "jpg", b"J1"), ("k1", "cls", None), ("dir/k", "2.seg.png", None)]  # bytes of images only
    assert index.ignored == 2 and index.suspicious == ["unsafe name '../evil.jpg'"]
    assert [k for k, *_ in ((m.key,) for m, _ in iter_wds(str(tar), keep=lambda k: k != "k1"))] == ["dir/k"]
    assert is_sa1b_tar("s3://b/sa_000123.tar") and not is_sa1b_tar(str(tar)) and not is_sa1b_tar("/x/000123.tar")


def test_bytes_gone_since_ingest_are_member_unreadable(tmp_path):
    from spar_pipeline.sources import MemberUnreadable

    path = tmp_path / "a.jpg"
    path.write_bytes(b"0123456789")
    assert read_member(str(path), 0, 10) == b"0123456789"
    path.write_bytes(b"01234")
    with pytest.raises(MemberUnreadable, match="short read"):
        read_member(str(path), 0, 10)
    path.unlink()
    with pytest.raises(ValueError, match=f"{path}: gone or unreadable since ingest") as e:
        read_member(str(path), 0, 10)
    assert isinstance(e.value, OSError) and len(str(e.value).splitlines()) == 1  # a stage rejects it; the CLI prints it


def test_s3_image_folders_are_listed_and_read_in_place(s3_bucket, tmp_path):
    import fsspec
    from _image_sources import image_folder

    paths = image_folder(tmp_path / "imgs", 3)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(str(tmp_path / "imgs"), f"{s3_bucket}/imgs", recursive=True)
    found = resolve_sources([f"{s3_bucket}/imgs"]).images
    assert [f.member for f in found] == ["img_000.jpg", "img_002.webp", "sub/img_001.png"]
    assert all(f.url.startswith(f"{s3_bucket}/imgs/") and f.regular for f in found)
    truth = {p.name: p.read_bytes() for p in paths}
    assert all(read_member(f.url, 0, f.size) == truth[f.member.rsplit("/", 1)[-1]] for f in found)
