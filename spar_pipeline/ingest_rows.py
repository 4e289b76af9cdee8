"""What one image becomes in the ingest manifest, whatever its source: the row, its id, its check.

SA-1B images keep their own ids (``sa_<id>.jpg``). Every other image gets a stable id from
where it lies: a hash of the image file's URL, or of a WebDataset tar's URL and the sample key,
with bit 62 set, so it never meets an SA-1B id and re-ingesting the same collection finds the
same ids (and adds nothing). The row's ``source`` and ``member`` record that place.

``--sample N --seed S`` ranks every candidate by a hash unit of (seed, id) and keeps the N
lowest: a seeded uniform subset whose membership depends only on the image and the threshold,
so a smaller N is nested in a larger one, and an image kept from a collection stays kept when
the collection grows unless a new image ranks below it.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from spar_pipeline.imageio import ImageRejected, decode_image

__all__ = ["STABLE_BASE", "stable_id", "sample_unit", "choose_sample", "row", "check_image", "few"]

STABLE_BASE = 1 << 62  # ids at or above this are stable ids; SA-1B's are far below


def stable_id(place: str) -> int:
    """The id of a non-SA-1B image from its place: ``file URL`` or ``tar URL#sample key``."""
    digest = hashlib.blake2b(place.encode("utf-8"), digest_size=8, person=b"spar-image-id").digest()
    return STABLE_BASE | (int.from_bytes(digest, "big") & (STABLE_BASE - 1))


def sample_unit(seed: int, image_id: int) -> float:
    """A uniform value in [0, 1) drawn from (seed, image id) alone."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8, person=b"spar-sample").digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def choose_sample(ids: Iterable[int], n: int, seed: int) -> set[int]:
    """The ``n`` ids ranking lowest by ``sample_unit(seed, id)`` (ties by id): all of them when fewer."""
    ranked = sorted(set(ids), key=lambda i: (sample_unit(seed, i), i))
    return set(ranked[:max(n, 0)])


def row(image_id: int, source: str, member: str, offset: int, size: int, status: str = "ok", reason: str = "",
        w: int = 0, h: int = 0, checksum: str = "") -> dict:
    """One ingest manifest row (columns as in manifests/ingest.json)."""
    return dict(image_id=image_id, source=source, member=member, offset=offset, size=size,
                width=w, height=h, checksum=checksum, status=status, reason=reason)


def check_image(data: bytes, max_pixels: int) -> tuple[str, str, int, int, str]:
    """(status, reason, width, height, checksum) of an image's bytes, decoded by the one decode function."""
    checksum = hashlib.sha256(data).hexdigest()[:32]
    try:
        h, w = decode_image(data, max_pixels).shape[:2]
    except ImageRejected as e:
        return "rejected", str(e), 0, 0, checksum
    return "ok", "", w, h, checksum


def few(items: list[str], n: int) -> str:
    """The first ``n`` items for a log line, and how many there are in all when more."""
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")
