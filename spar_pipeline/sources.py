"""Tars and image files read in place: resolve SOURCE arguments, index member headers, byte-range reads.

A SOURCE is a tar, an image file, a folder (searched recursively) or a glob, local or an fsspec
URL. A tar named ``sa_<digits>.tar`` is read as SA-1B; any other ``.tar`` as a WebDataset shard.
A tar is never extracted and a member name never becomes a filesystem path: SA-1B members are
matched against ``sa_<id>.jpg`` / ``sa_<id>.json`` (optionally ``./``-prefixed), WebDataset
members are split into ``key.ext``, and anything else — links, directories, devices, ``../`` or
absolute names — is counted and ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec

from spar_pipeline.errors import SourceError, first_line
from spar_pipeline.fsutil import filesystem, redact

__all__ = [
    "Member", "ImageFile", "IMAGE_EXTS", "MemberUnreadable", "TarIndex", "Resolved", "SourceError",
    "tar_name", "show_url", "read_links", "resolve_sources", "index_tar", "iter_tar",
    "image_ext", "read_member",
]

log = logging.getLogger(__name__)
SA_MEMBER = re.compile(r"^(?:\./)?sa_(\d+)\.(jpg|json)$")
SA_TAR = re.compile(r"^(?:sa_)?(\d+)(?:\.tar)?$")
SA1B_TAR_FILE = re.compile(r"^sa_\d+\.tar$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image files and WebDataset image members (any case)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_FETCHED = ("http", "https")  # signed, expiring URLs: copied next to the run, then read in place
_BLOCK = 8 << 20


@dataclass(frozen=True)
class Member:
    name: str
    image_id: int
    kind: str  # "jpg" or "json"
    offset: int  # byte offset of the member's data inside the tar
    size: int


@dataclass(frozen=True)
class ImageFile:
    url: str  # canonical: an absolute path or protocol://path (what read_member reads)
    member: str  # the path below the SOURCE folder (or glob prefix) that found it
    size: int
    regular: bool  # False: a broken link, FIFO, device... (never opened)


class MemberUnreadable(SourceError, ValueError):
    """Bytes a manifest row names are gone or shorter (deleted, moved, truncated after ingest): bad
    input for the stage reading them, rejected with this one line, not a crash to retry."""


@dataclass
class TarIndex:
    """What walking one tar found besides its members."""

    ignored: int = 0  # members that are not sa_<id>.jpg/json regular files
    filtered: int = 0  # sa_<id> members left out by the caller's ``keep`` (e.g. above --max-id)
    suspicious: list[str] = field(default_factory=list)  # links and unsafe names among them
    error: str = ""  # why the walk stopped early ("" when it reached the end)
    warnings: list[str] = field(default_factory=list)  # filled by the caller (ingest)


@dataclass
class Resolved:
    urls: list[str]  # tar URLs, de-duplicated, sorted by tar name then URL; local ones as absolute paths
    failed: list[str] = field(default_factory=list)  # one message per SOURCE that gave nothing (already logged)
    images: list[ImageFile] = field(default_factory=list)  # image files, de-duplicated, sorted by URL


# ---- filesystems ----------------------------------------------------------------------------
_FS: dict[tuple, fsspec.AbstractFileSystem] = {}


def _fs(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsutil.filesystem`` with a per-process cache keyed by protocol and options."""
    if "::" in url:  # chained URLs: no shortcut
        return filesystem(url, storage_options)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    env = (os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    key = (os.getpid(), protocol, json.dumps(storage_options or {}, sort_keys=True, default=str), env)
    fs = _FS.get(key)
    if fs is None:
        fs, path = filesystem(url, storage_options)
        _FS[key] = fs
        return fs, path
    return fs, fs._strip_protocol(url)


def show_url(url: str) -> str:
    """A URL safe to print or store: no query string (SA-1B CDN links are signed), no secrets."""
    if url.split("://", 1)[0] in _FETCHED:
        url = url.split("?", 1)[0]
    return redact(url)


def tar_name(spec: str) -> str:
    """``sa_000000``, ``sa_000000.tar`` or ``0`` → ``sa_000000.tar``."""
    m = SA_TAR.match(spec.strip())
    if m is None:
        raise SourceError(f"--tars {spec!r}: not an SA-1B tar name (e.g. sa_000000 or sa_000000.tar)")
    return f"sa_{int(m.group(1)):06d}.tar"


# ---- resolving SOURCE arguments -----------------------------------------------------------------
def read_links(path: str, storage_options: dict | None = None) -> dict[str, str]:
    """The official links file: ``file_name<TAB>url`` per line (a ``file_name cdn_link`` header is skipped)."""
    fs, p = _fs(path, storage_options)
    try:
        text = fs.cat_file(p).decode("utf-8", "replace")
    except FileNotFoundError:
        raise SourceError(f"links file {redact(path)}: not found") from None
    links = {}
    for line in text.splitlines():
        parts = line.strip().split("\t")
        if len(parts) == 2 and SA_TAR.match(parts[0]) and "://" in parts[1]:
            links[tar_name(parts[0])] = parts[1]
    if not links:
        raise SourceError(f"links file {redact(path)}: no 'sa_NNNNNN.tar<TAB>url' lines")
    return links


def _canonical(fs: fsspec.AbstractFileSystem, src: str, path: str) -> str:
    """Local tars as absolute paths (any cwd reads them later), others as protocol://path."""
    if "://" not in src or src.startswith("file://"):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def image_ext(path: str) -> bool:
    """An image file name (jpg, jpeg, png, webp in any case); hidden files (``._x.jpg``) are not."""
    base = path.rsplit("/", 1)[-1]
    return not base.startswith(".") and "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def _expand(src: str, storage_options: dict | None) -> tuple[list[str], list[ImageFile]]:
    """One SOURCE argument → tar URLs and image files (a single file that is no image is a tar)."""
    if src.split("://", 1)[0] in _FETCHED:
        return [src], []
    fs, path = _fs(src, storage_options)
    globbed = [path.find(ch) for ch in "*?[" if ch in path]
    if globbed:
        found, root = fs.glob(path, detail=True), path[:min(globbed)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        found, root = fs.find(path, detail=True), path.rstrip("/")
    elif fs.exists(path):
        if fs.info(path).get("type") == "other":  # a pipe or device: reading it could wait forever
            raise SourceError("not a regular file (a pipe or a device)")
        if not image_ext(path):
            return [_canonical(fs, src, path)], []
        found, root = {path: fs.info(path)}, path.rsplit("/", 1)[0]
    else:
        raise SourceError("no such tar, image file, folder or glob match")
    found = {p: info for p, info in found.items() if info.get("type") != "directory"}
    tars = [_canonical(fs, src, p) for p in sorted(found) if p.endswith(".tar")]
    images = [ImageFile(_canonical(fs, src, p), p[len(root) + 1:] if p.startswith(root + "/") else p.rsplit("/", 1)[-1],
                        int(info.get("size") or 0), info.get("type") == "file")
              for p, info in sorted(found.items()) if image_ext(p)]
    return tars, images


def _fetch(url: str, dest: str, storage_options: dict | None) -> str:
    """Copy a signed URL's tar to ``dest`` (whole-or-nothing), so later stages read it in place."""
    dst_fs, dst = _fs(dest, storage_options)
    if dst_fs.exists(dst):
        return dest
    src_fs, src = _fs(url, None)
    log.info("fetching %s → %s", show_url(url), redact(dest))
    tmp = f"{dst}.part"
    dst_fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
    copied = 0
    with src_fs.open(src, "rb", block_size=_BLOCK) as fin, dst_fs.open(tmp, "wb") as fout:
        expected = getattr(fin, "size", None)
        while chunk := fin.read(_BLOCK):
            fout.write(chunk)
            copied += len(chunk)
    if expected is not None and copied != expected:
        dst_fs.rm(tmp)
        raise OSError(f"short download: {copied} of {expected} bytes")
    dst_fs.mv(tmp, dst)
    return dest


def resolve_sources(
    sources: list[str],
    links: str | None = None,
    tars: list[str] | None = None,
    storage_options: dict | None = None,
    download_dir: str | None = None,
) -> Resolved:
    """Tar URLs and image files from paths, globs, folders, fsspec URLs, or the links file plus tar names.

    With ``links``, ``tars`` picks rows of the links file; without it, ``tars`` keeps only the
    sources with those names. Links-file tars and ``http(s)`` tars are copied once to
    ``download_dir`` (the run's ``source/``) and read in place from there: signed URLs expire
    and carry secrets, so they never reach a manifest. What could not be resolved comes back in
    ``failed``, unlogged: the caller says it once, in a log line or in its own error.
    """
    out: list[str] = []
    failed: list[str] = []
    wanted = [tar_name(t) for t in (tars or []) if t.strip()]

    def add(url: str, name: str | None = None) -> None:
        """``name`` given: a links-file row, always fetched (those links are signed and expire)."""
        if download_dir and (name or url.split("://", 1)[0] in _FETCHED):
            name = name or url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            try:
                url = _fetch(url, f"{download_dir}/{name}", storage_options)
            except Exception as e:  # one tar's fetch failing never stops the others
                failed.append(f"{name}: fetch from {show_url(url)} failed ({first_line(e)})")
                return
        out.append(url)

    images: dict[str, ImageFile] = {}
    for src in sources:
        try:
            found, imgs = _expand(src, storage_options)
        except Exception as e:
            failed.append(f"source {show_url(src)}: {first_line(e)}")
            continue
        if not found and not imgs:
            failed.append(f"source {show_url(src)}: no .tar files match (nor {'/'.join(IMAGE_EXTS)} images)")
        for im in imgs:
            images.setdefault(im.url, im)
        if wanted and not links:
            found = [u for u in found if u.split("?", 1)[0].rsplit("/", 1)[-1] in wanted]
        for url in found:
            add(url)
    if links:
        if not wanted:
            raise SourceError("--links needs --tars NAME,... (e.g. --tars sa_000000,sa_000001)")
        table = read_links(links, storage_options)
        missing = [t for t in wanted if t not in table]
        if missing:
            raise SourceError(f"links file {redact(links)}: no row for {', '.join(missing)}")
        for name in wanted:
            add(table[name], name)
    elif wanted:
        names = {u.split("?", 1)[0].rsplit("/", 1)[-1] for u in out}
        for name in wanted:
            if name not in names:
                failed.append(f"--tars {name}: not among the given sources")
    return Resolved(sorted(set(out), key=lambda u: (u.split("?", 1)[0].rsplit("/", 1)[-1], u)), failed,
                    [images[u] for u in sorted(images)])


# ---- reading tars ---------------------------------------------------------------------------
def _unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _parse_sa(name: str) -> tuple[int, str] | None:
    m = SA_MEMBER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def _classify(info: tarfile.TarInfo, index: TarIndex, parse: Callable[[str], tuple | None]) -> tuple | None:
    """The parsed name of a regular file ``parse`` accepts; anything else is counted and ignored."""
    parsed = parse(info.name) if info.type in _REGULAR and info.sparse is None else None
    if parsed is not None:
        return parsed
    index.ignored += 1
    if info.issym() or info.islnk():
        index.suspicious.append(f"link {info.name!r}")
    elif _unsafe(info.name):
        index.suspicious.append(f"unsafe name {info.name!r}")
    elif info.isdev():
        index.suspicious.append(f"device {info.name!r}")
    return None


def _why_stopped(f, offset: int, size: int) -> str:
    """tarfile stops quietly at a damaged header after the first: tell damage from the end."""
    if offset >= size:
        return ""  # ends right after a member; no end-of-archive blocks, but nothing lost
    f.seek(offset)
    block = f.read(512)
    if not any(block):
        return ""
    if len(block) < 512:
        return f"truncated tar: partial header at offset {offset}"
    try:
        stored = tarfile.nti(block[148:156])
    except tarfile.HeaderError:
        stored = -1
    if stored not in tarfile.calc_chksums(block):
        return f"bad tar header checksum at offset {offset}"
    return f"unreadable tar header at offset {offset}"


def _walk(url: str, storage_options: dict | None, index: TarIndex, parse: Callable[[str], tuple | None],
          want: Callable[[tuple], bool], keep: Callable[[tuple], bool] | None = None,
          ) -> Iterator[tuple[str, tuple, int, int, bytes | None]]:
    """(name, parsed name, data offset, size, bytes when ``want``) per accepted member, in tar order."""
    fs, path = _fs(url, storage_options)
    with fs.open(path, "rb", block_size=_BLOCK) as f:
        size = f.size if getattr(f, "size", None) is not None else fs.size(path)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            index.error = f"not a readable tar ({e})"
            return
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                index.error = f"bad tar header after offset {tf.offset} ({e})"
                return
            if info is None:
                index.error = _why_stopped(f, tf.offset, size)
                return
            parsed = _classify(info, index, parse)
            if parsed is None:
                continue
            if info.offset_data + info.size > size:
                index.error = f"truncated tar: {info.name} ends at {info.offset_data + info.size}, the file at {size}"
                return
            if keep is not None and not keep(parsed):
                index.filtered += 1
                continue
            data = None
            if want(parsed):
                try:
                    data = tf.extractfile(info).read()  # bytes in memory; nothing touches the filesystem
                except (tarfile.TarError, EOFError, OSError) as e:
                    index.error = f"truncated tar at {info.name} ({e})"
                    return
                if len(data) != info.size:
                    index.error = f"truncated tar at {info.name} ({len(data)} of {info.size} bytes)"
                    return
            yield info.name, parsed, info.offset_data, info.size, data


def index_tar(url: str, storage_options: dict | None = None, index: TarIndex | None = None) -> Iterator[Member]:
    """Members of an SA-1B tar (name, data offset, size) from their headers alone.

    A truncated tar or a damaged header ends the walk: the members before it are yielded
    and ``index.error`` says where and why.
    """
    for name, (image_id, kind), offset, size, _ in _walk(
            url, storage_options, index if index is not None else TarIndex(), _parse_sa, lambda p: False):
        yield Member(name, image_id, kind, offset, size)


def iter_tar(url: str, storage_options: dict | None = None, index: TarIndex | None = None,
             keep: Callable[[int], bool] | None = None) -> Iterator[tuple[Member, bytes]]:
    """Members with their bytes in one sequential pass (what ingest needs to decode each image);
    members whose id fails ``keep`` are skipped unread."""
    for name, (image_id, kind), offset, size, data in _walk(
            url, storage_options, index if index is not None else TarIndex(), _parse_sa, lambda p: True,
            (lambda p: keep(p[0])) if keep is not None else None):
        yield Member(name, image_id, kind, offset, size), data


def read_member(url: str, offset: int, size: int, storage_options: dict | None = None) -> bytes:
    """One byte-range read of a member's data (offset 0 and the file's size for an image file)."""
    fs, path = _fs(url, storage_options)
    try:
        data = fs.cat_file(path, start=offset, end=offset + size)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise MemberUnreadable(f"{show_url(url)}: gone or unreadable since ingest ({type(e).__name__})") from None
    if len(data) != size:
        raise MemberUnreadable(f"{show_url(url)}: short read at {offset} ({len(data)} of {size} bytes)")
    return data
