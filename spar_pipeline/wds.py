"""WebDataset shards read in place: members grouped into samples by key, one image per sample.

A member ``dir/abc.seg.png`` belongs to sample ``dir/abc`` (the name up to the first dot of its
last part, as WebDataset splits it). A sample's image is its ``jpg``/``jpeg``/``png``/``webp``
member; other members (labels, captions, JSON) are counted as ignored. A sample's members are
consecutive in a shard: a key that comes back after another sample is a repeated key, and only
its first sample is used. A sample without an image is a rejected row, so it is reported once
and never looked at again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from spar_pipeline.ingest_rows import check_image, few, row, stable_id
from spar_pipeline.sources import IMAGE_EXTS, SA1B_TAR_FILE, TarIndex, _unsafe, _walk, show_url

__all__ = ["WdsMember", "is_sa1b_tar", "iter_wds", "sample_id", "wds_candidates", "wds_rows"]

WDS_MEMBER = re.compile(r"^(?:\./)?((?:.*/)?[^./][^/.]*)\.([^/]+)$")


@dataclass(frozen=True)
class WdsMember:
    name: str
    key: str  # the sample key ("./" dropped)
    ext: str  # the rest: "jpg", "seg.png", "json", ...
    offset: int
    size: int


def _parse(name: str) -> tuple[str, str] | None:
    m = WDS_MEMBER.match(name)
    return (m.group(1), m.group(2)) if m and not _unsafe(name) else None


def _is_image(ext: str) -> bool:
    return ext.lower() in IMAGE_EXTS


def is_sa1b_tar(url: str) -> bool:
    """SA-1B tars are named ``sa_<digits>.tar``; every other tar is read as a WebDataset shard."""
    return SA1B_TAR_FILE.match(show_url(url).rstrip("/").rsplit("/", 1)[-1]) is not None


def sample_id(url: str, key: str) -> int:
    """The stable id of sample ``key`` in the shard at ``url``."""
    return stable_id(f"{url}#{key}")


def iter_wds(url: str, storage_options: dict | None = None, index: TarIndex | None = None,
             keep: Callable[[str], bool] | None = None, with_data: bool = True,
             ) -> Iterator[tuple[WdsMember, bytes | None]]:
    """Members in one sequential pass, bytes read for image members only (``with_data``);
    members whose sample key fails ``keep`` are skipped unread."""
    for name, (key, ext), offset, size, data in _walk(
            url, storage_options, index if index is not None else TarIndex(), _parse,
            lambda p: with_data and _is_image(p[1]), (lambda p: keep(p[0])) if keep is not None else None):
        yield WdsMember(name, key, ext, offset, size), data


def wds_candidates(url: str, storage_options: dict | None = None, index: TarIndex | None = None) -> list[int]:
    """Ids of the samples that have an image, from the headers alone (what ``--sample`` ranks)."""
    return sorted({sample_id(url, m.key) for m, _ in iter_wds(url, storage_options, index, with_data=False)
                   if _is_image(m.ext)})


def wds_rows(url: str, max_pixels: int, storage_options: dict | None = None,
             only: frozenset[int] | None = None) -> tuple[list[dict], TarIndex]:
    """One row per sample of a shard (ok, or rejected with a reason), in shard order; ``only``:
    the sample ids to read (the others are skipped unread). ``index.warnings`` gets one line per
    problem; a damaged shard sets ``index.error`` and keeps the samples before the damage."""
    index = TarIndex()
    name = show_url(url).rsplit("/", 1)[-1]
    keep = (lambda key: sample_id(url, key) in only) if only is not None else None
    rows: dict[str, dict | None] = {}  # key -> its row, None until the sample's image is met
    others: dict[str, list[str]] = {}  # key -> its non-image members
    current, repeated, extra = None, [], []
    for m, data in iter_wds(url, storage_options, index, keep):
        if m.key != current and m.key in rows:
            repeated.append(m.name)
            index.ignored += 1
            continue
        current = m.key
        rows.setdefault(m.key, None)
        if not _is_image(m.ext):
            others.setdefault(m.key, []).append(m.name)
            index.ignored += 1
        elif rows[m.key] is not None:
            (repeated if rows[m.key]["member"] == m.name else extra).append(m.name)
            index.ignored += 1
        else:
            status, reason, w, h, checksum = check_image(data, max_pixels)
            rows[m.key] = row(sample_id(url, m.key), url, m.name, m.offset, m.size, status, reason, w, h, checksum)
    if index.error and current is not None and rows.get(current) is None:
        rows.pop(current)  # its image may lie past the damage: neither rowed nor rejected
    if repeated:
        index.warnings.append(f"{name}: {len(repeated)} member(s) of repeated sample keys ({few(repeated, 3)}); "
                              "the first sample of each key is kept")
    if extra:
        index.warnings.append(f"{name}: {len(extra)} more image(s) in samples that have one ({few(extra, 3)}); "
                              "the first image of each sample is used")
    if index.suspicious:
        index.warnings.append(f"{name}: ignored {few(index.suspicious, 4)}; never followed or extracted")
    out = []
    for key, r in rows.items():
        if r is None:
            index.ignored -= len(others[key])  # rowed as the rejected sample, not ignored
            r = row(sample_id(url, key), url, key, 0, 0, "rejected",
                    f"sample has no {'/'.join(IMAGE_EXTS)} member ({few(others[key], 3)})")
        if r["status"] == "rejected":
            index.warnings.append(f"{name}: {r['member']}: {r['reason']}; rejected")
        out.append(r)
    return out, index
