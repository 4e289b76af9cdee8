"""SA-1B tars read in place: resolve SOURCE arguments, index member headers, byte-range reads.

A tar is never extracted and a member name never becomes a filesystem path: members are
matched against ``sa_<id>.jpg`` / ``sa_<id>.json`` (optionally ``./``-prefixed) and anything
else — links, directories, ``../`` or absolute names — is counted and ignored.
"""

from __future__ import annotations

import glob
import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from spar_pipeline.fsutil import filesystem, redact

__all__ = ["Member", "TarIndex", "resolve_sources", "read_links", "iter_tar", "read_member"]

log = logging.getLogger(__name__)
SA_MEMBER = re.compile(r"^(?:\./)?sa_(\d+)\.(jpg|json)$")
SA_TAR = re.compile(r"^sa_\d{6}(\.tar)?$")


@dataclass(frozen=True)
class Member:
    name: str
    image_id: int
    kind: str  # "jpg" or "json"
    offset: int  # byte offset of the member's data inside the tar
    size: int


@dataclass
class TarIndex:
    """What walking one tar found besides its members."""

    ignored: int = 0  # members that are not sa_<id>.jpg/json regular files
    error: str = ""  # why the walk stopped early ("" when it reached the end)
    warnings: list[str] = field(default_factory=list)


def read_links(path: str, storage_options: dict | None = None) -> dict[str, str]:
    """The official links file: ``file_name<TAB>url`` per line, a header line first."""
    fs, p = filesystem(path, storage_options)
    links = {}
    for line in fs.cat_file(p).decode().splitlines():
        parts = line.strip().split("\t")
        if len(parts) == 2 and parts[0] != "file_name":
            links[parts[0]] = parts[1]
    return links


def _download(url: str, dest: str, storage_options: dict | None) -> str:
    """Copy a (signed, expiring) URL's tar next to the run, so later stages read it in place."""
    src_fs, src = filesystem(url)
    dst_fs, dst = filesystem(dest, storage_options)
    if dst_fs.exists(dst):
        return dest
    log.info("fetching %s → %s", redact(url), dest)
    tmp = dst + ".part"
    with src_fs.open(src, "rb", block_size=8 << 20) as fin, dst_fs.open(tmp, "wb") as fout:
        while chunk := fin.read(8 << 20):
            fout.write(chunk)
    dst_fs.mv(tmp, dst)
    return dest


def resolve_sources(
    sources: list[str],
    links: str | None = None,
    tars: list[str] | None = None,
    storage_options: dict | None = None,
    download_dir: str | None = None,
) -> list[str]:
    """Tar URLs, sorted and de-duplicated, from paths, globs, folders, URLs or the links file."""
    out: list[str] = []
    for src in sources:
        fs, path = filesystem(src, storage_options)
        proto = src.split("://", 1)[0] + "://" if "://" in src else ""
        if any(ch in path for ch in "*?["):
            matches = glob.glob(path) if not proto else [proto + m for m in fs.glob(path)]
            out += [m for m in matches if m.endswith(".tar")]
        elif fs.isdir(path):
            out += [(proto + p if proto else p) for p in fs.find(path) if p.endswith(".tar")]
        else:
            if not fs.exists(path):
                raise FileNotFoundError(f"source {redact(src)}: no such tar, folder or glob match")
            out.append(src)
    if links:
        table = read_links(links, storage_options)
        wanted = [t if t.endswith(".tar") else f"{t}.tar" for t in (tars or [])]
        if not wanted:
            raise ValueError("--links needs --tars NAME,... (e.g. sa_000000,sa_000001)")
        missing = [t for t in wanted if t not in table]
        if missing:
            raise ValueError(f"{links}: no row for {', '.join(missing)}")
        for name in wanted:
            out.append(_download(table[name], f"{download_dir}/{name}", storage_options) if download_dir
                       else table[name])
    return sorted(set(out))


def iter_tar(url: str, storage_options: dict | None = None, index: TarIndex | None = None) -> Iterator[tuple[Member, bytes]]:
    """Members of an SA-1B tar with their bytes, streamed in one sequential pass."""
    index = index if index is not None else TarIndex()
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb", block_size=8 << 20) as f:
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
                break
            m = SA_MEMBER.match(info.name)
            if not info.isfile() or m is None:
                index.ignored += 1
                continue
            try:
                data = tf.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                index.error = f"truncated tar at {info.name} ({e})"
                return
            if len(data) != info.size:
                index.error = f"truncated tar at {info.name}"
                return
            yield Member(info.name, int(m.group(1)), m.group(2), info.offset_data, info.size), data
        # tarfile stops quietly at a damaged header after the first one: say so.
        f.seek(tf.offset)
        rest = f.read(512)
        if rest and any(rest):
            index.error = f"bad tar header at offset {tf.offset}; the members after it were not read"


def read_member(url: str, offset: int, size: int, storage_options: dict | None = None) -> bytes:
    """One byte-range read of a member's data."""
    fs, path = filesystem(url, storage_options)
    data = fs.cat_file(path, start=offset, end=offset + size)
    if len(data) != size:
        raise OSError(f"{redact(url)}: short read at {offset} ({len(data)} of {size} bytes)")
    return data


def member_kinds(members: list[Member]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for m in members:
        out.setdefault(m.image_id, {})[m.kind] = m
    return out
