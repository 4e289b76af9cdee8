"""SA-1B-layout tars of generated images, for the demo, the tests and benchmarks (no download anywhere).

Each image is ``sa_<id>.jpg`` plus an ``sa_<id>.json`` sidecar shaped like SA-1B's, in one
uncompressed tar. ``bad`` injects per-image faults the ingest stage must survive, ``extras``
adds members a reader must ignore, and ``damage_tar`` breaks the tar itself.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "synthetic_image",
    "make_sa1b_tar",
    "make_sa1b_source",
    "damage_tar",
    "BAD_KINDS",
    "REJECTED_KINDS",
    "ACCEPTED_KINDS",
    "add_member",
    "encode",
]

# Faults that must end as a rejected row (value: a word the reason contains) ...
REJECTED_KINDS = {
    "truncated": "truncated",  # JPEG cut in half
    "header_only": "corrupt",  # JPEG headers, no scan data
    "corrupt": "corrupt",  # JPEG with its Huffman tables overwritten
    "not_image": "not an image",  # plain text
    "html": "not an image",  # an HTTP error page saved as .jpg
    "eps": "not an image",  # PostScript: never handed to Ghostscript
    "empty": "empty",  # zero-byte member
    "bomb": "decompression bomb",  # tiny JPEG declaring 60000×60000 (past PIL's own limit)
    "bomb_soft": "decompression bomb",  # tiny JPEG declaring 10000×9000 (past the recipe limit only)
    "tiny_1xN": "degenerate",  # 1 pixel wide
    "tiny_Nx1": "degenerate",  # 1 pixel high
    "sidecar_mismatch": "disagrees with JSON sidecar",
    "sidecar_malformed": "sidecar malformed",
    "sidecar_truncated": "sidecar malformed",
    "sidecar_no_size": "sidecar malformed",
    "sidecar_wrong_id": "sidecar names image",
}
# ... and inputs that are odd but fine: decoded to 8-bit RGB and accepted.
ACCEPTED_KINDS = (
    "cmyk", "gray", "palette", "palette_transparent", "16bit", "rgba", "la", "png_named_jpg",
    "progressive", "exif_rotated", "sidecar_missing",
)
BAD_KINDS = tuple(REJECTED_KINDS) + ACCEPTED_KINDS


def synthetic_image(image_id: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A structured RGB image (gradient, texture, soft shapes), deterministic in (seed, id)."""
    w, h = size
    rng = np.random.default_rng([seed, image_id])
    x = np.arange(w, dtype=np.float32)[None, :, None]  # broadcast, never a full H×W grid per term
    y = np.arange(h, dtype=np.float32)[:, None, None]
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    t = (x / max(w - 1, 1) * rng.uniform(0.2, 1) + y / max(h - 1, 1) * rng.uniform(0.2, 1)) / 2
    bg = c0 + (c1 - c0) * t
    bg += 12 * np.sin(x / rng.uniform(3, 12)) * np.cos(y / rng.uniform(3, 12))
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        sw, sh = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [x0, y0, x0 + sw, y0 + sh]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(0.6))  # soft edges, like a photo
    grain = rng.integers(-4, 5, (h, w, 1), dtype=np.int16)  # sensor-like grain, small next to the structure
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + grain, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    """The image's file bytes in ``fmt`` (JPEG at quality 90 unless ``quality`` is given)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _with_sof_size(jpeg: bytes, w: int, h: int) -> bytes:
    """The same JPEG with another size in its frame header (what a decompression bomb looks like)."""
    at = jpeg.find(b"\xff\xc0")
    data = bytearray(jpeg)
    data[at + 5 : at + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _image_bytes(image_id: int, size: tuple[int, int], seed: int, kind: str | None) -> tuple[bytes, tuple[int, int]]:
    """(member bytes, the size its sidecar states) for one image of the given fault kind."""
    im = synthetic_image(image_id, size, seed)
    if kind in (None, "sidecar_missing") or kind.startswith("sidecar_"):
        return encode(im), size
    if kind == "truncated":
        data = encode(im)
        return data[: len(data) // 2], size
    if kind == "header_only":
        data = encode(im)
        return data[: data.find(b"\xff\xda")], size
    if kind == "corrupt":
        data = bytearray(encode(im))
        at = data.find(b"\xff\xc4")  # first Huffman table: overwrite it and what follows
        data[at + 4 : at + 400] = bytes(range(256)) + bytes(range(140))
        return bytes(data), size
    if kind == "not_image":
        return b"this is not an image, just text " * 20, size
    if kind == "html":
        return b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1>URL signature expired</body></html>\n", size
    if kind == "eps":
        return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\n%%EOF\n", size
    if kind == "empty":
        return b"", size
    if kind == "bomb":
        return _with_sof_size(encode(im), 60000, 60000), (60000, 60000)
    if kind == "bomb_soft":
        return _with_sof_size(encode(im), 10000, 9000), (10000, 9000)
    if kind == "tiny_1xN":
        return encode(im.resize((1, size[1]))), (1, size[1])
    if kind == "tiny_Nx1":
        return encode(im.resize((size[0], 1))), (size[0], 1)
    if kind == "cmyk":
        return encode(im.convert("CMYK")), size
    if kind == "gray":
        return encode(im.convert("L")), size
    if kind == "palette":
        return encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), size
    if kind == "palette_transparent":
        return encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0), size
    if kind == "16bit":  # 16-bit grayscale PNG whose top byte is the 8-bit gray
        arr = np.asarray(im.convert("L"), dtype=np.uint16) * 257
        return encode(Image.fromarray(arr), "PNG"), size
    if kind == "rgba":
        return encode(im.convert("RGBA"), "PNG"), size
    if kind == "la":
        return encode(im.convert("LA"), "PNG"), size
    if kind == "png_named_jpg":
        return encode(im, "PNG"), size
    if kind == "progressive":
        return encode(im, progressive=True), size
    if kind == "exif_rotated":  # orientation 6: decoded turned 90° clockwise; the sidecar keeps the stored size
        exif = Image.Exif()
        exif[0x0112] = 6
        return encode(im, exif=exif.tobytes()), size
    raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(BAD_KINDS)}")


def _sidecar(image_id: int, w: int, h: int, kind: str | None, rng: np.random.Generator) -> bytes | None:
    """SA-1B's per-image JSON: the image record, then mask annotations (small fake RLEs here)."""
    if kind == "sidecar_missing":
        return None
    image = {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"}
    if kind == "sidecar_mismatch":
        image["width"] = w + 7
    if kind == "sidecar_wrong_id":
        image["image_id"] = image_id + 1000
    if kind == "sidecar_no_size":
        del image["width"]
    annotations = []
    for k in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, max(w // 2, 1))), int(rng.integers(0, max(h // 2, 1)))
        annotations.append({
            "id": image_id * 100 + k, "bbox": [x, y, w // 4, h // 4], "area": (w // 4) * (h // 4),
            "segmentation": {"size": [h, w], "counts": "".join(chr(48 + int(c)) for c in rng.integers(0, 60, 40))},
            "predicted_iou": float(rng.uniform(0.8, 1)), "stability_score": float(rng.uniform(0.9, 1)),
            "crop_box": [0, 0, w, h], "point_coords": [[x + 1.5, y + 1.5]],
        })
    body = json.dumps({"image": image, "annotations": annotations}).encode()
    if kind == "sidecar_malformed":
        return b"{not json" + body[9:]
    if kind == "sidecar_truncated":
        return body[: len(body) * 2 // 3]
    return body


def add_member(tf: tarfile.TarFile, name: str, data: bytes, typ: bytes = tarfile.REGTYPE, linkname: str = "") -> None:
    """Append one member with mtime 0, so a tar is a pure function of its contents."""
    info = tarfile.TarInfo(name)
    info.type = typ
    info.linkname = linkname
    info.size = len(data) if typ == tarfile.REGTYPE else 0
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data) if typ == tarfile.REGTYPE else None)


def make_sa1b_tar(
    path: str | Path,
    ids: list[int],
    size: tuple[int, int] | Callable[[int], tuple[int, int]] = (240, 160),
    seed: int = 0,
    dot_prefix: bool = False,
    bad: dict[int, str] | None = None,
    extras: bool = False,
) -> Path:
    """An SA-1B-layout tar: ``sa_<id>.jpg`` then ``sa_<id>.json`` per id, in the order given.

    ``size`` is (W, H) or a function of the id; ``bad`` maps ids to a kind of ``BAD_KINDS``;
    ``extras`` adds members a reader must ignore: a directory, ``../`` and absolute names,
    a symlink, a hard link, a device and an unrelated file (ids 999991…).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "./" if dot_prefix else ""
    bad = bad or {}
    unknown = sorted(set(bad.values()) - set(BAD_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(BAD_KINDS)}")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        if extras:
            add_member(tf, f"{prefix}subdir", b"", tarfile.DIRTYPE)
        for i in ids:
            kind = bad.get(i)
            data, (w, h) = _image_bytes(i, size(i) if callable(size) else size, seed, kind)
            add_member(tf, f"{prefix}sa_{i}.jpg", data)
            body = _sidecar(i, w, h, kind, np.random.default_rng([seed, i, 1]))
            if body is not None:
                add_member(tf, f"{prefix}sa_{i}.json", body)
        if extras:
            add_member(tf, "../sa_999991.jpg", encode(synthetic_image(999991, (32, 32))))
            add_member(tf, "/abs/sa_999992.jpg", encode(synthetic_image(999992, (32, 32))))
            add_member(tf, f"{prefix}sa_999993.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
            add_member(tf, f"{prefix}sa_999994.jpg", b"", tarfile.LNKTYPE, f"{prefix}sa_{ids[0]}.jpg" if ids else "x")
            add_member(tf, f"{prefix}sa_999995.jpg", b"", tarfile.CHRTYPE)
            add_member(tf, f"{prefix}notes.txt", b"not part of SA-1B\n")
    return path


def damage_tar(path: str | Path, kind: str, member: int) -> Path:
    """Break a tar at its ``member``-th member (0-based): ``truncate`` cuts the file inside that
    member's data; ``bad_checksum`` flips a byte of its header without fixing the checksum."""
    path = Path(path)
    with tarfile.open(path) as tf:
        info = tf.getmembers()[member]
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        del data[info.offset_data + max(info.size // 2, 1) :]
    elif kind == "bad_checksum":
        data[info.offset + 2] ^= 0x20  # inside the name field
    else:
        raise ValueError(f"unknown tar damage {kind!r}; known: truncate, bad_checksum")
    path.write_bytes(bytes(data))
    return path


def make_sa1b_source(
    directory: str | Path, n_tars: int = 2, per_tar: int = 4, size: tuple[int, int] = (240, 160), seed: int = 0
) -> list[Path]:
    """``sa_000000.tar``… with consecutive image ids from 1, like SA-1B (3:2 images, W×H)."""
    directory = Path(directory)
    return [
        make_sa1b_tar(directory / f"sa_{t:06d}.tar", list(range(1 + t * per_tar, 1 + (t + 1) * per_tar)), size, seed)
        for t in range(n_tars)
    ]
