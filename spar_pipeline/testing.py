"""Generated SA-1B-layout tars for tests, the demo and benchmarks (no download anywhere).

Each image is ``sa_<id>.jpg`` plus an ``sa_<id>.json`` sidecar shaped like SA-1B's, in one
uncompressed tar. ``bad`` injects the faults the ingest stage must survive.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["synthetic_image", "make_sa1b_tar", "make_sa1b_source", "BAD_KINDS"]

BAD_KINDS = (
    "truncated", "corrupt", "not_image", "empty", "bomb", "cmyk", "gray", "palette", "16bit", "rgba",
    "tiny_1xN", "sidecar_mismatch", "sidecar_missing", "sidecar_malformed", "png_named_jpg",
)


def synthetic_image(image_id: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A structured RGB image (gradient background, shapes, texture), deterministic in (seed, id)."""
    w, h = size
    rng = np.random.default_rng([seed, image_id])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / max(w - 1, 1) * rng.uniform(0.2, 1) + yy / max(h - 1, 1) * rng.uniform(0.2, 1)) / 2
    bg = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    bg += 12 * np.sin(xx[..., None] / rng.uniform(3, 12)) * np.cos(yy[..., None] / rng.uniform(3, 12))
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        sw, sh = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [x0, y0, x0 + sw, y0 + sh]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return im


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _image_bytes(image_id: int, size: tuple[int, int], seed: int, kind: str | None) -> tuple[bytes, tuple[int, int]]:
    im = synthetic_image(image_id, size, seed)
    if kind is None:
        return _jpeg(im), size
    if kind == "truncated":
        data = _jpeg(im)
        return data[: len(data) // 2], size
    if kind == "corrupt":
        data = bytearray(_jpeg(im))
        data[200:] = bytes(len(data) - 200)  # header intact, entropy-coded data zeroed
        return bytes(data), size
    if kind == "not_image":
        return b"this is not an image, just text " * 20, size
    if kind == "empty":
        return b"", size
    if kind == "bomb":  # a tiny file declaring an enormous image
        big = Image.new("L", (12000, 12000))
        buf = io.BytesIO()
        big.save(buf, "PNG")
        return buf.getvalue(), (12000, 12000)
    if kind == "cmyk":
        return _jpeg(im.convert("CMYK")), size
    if kind == "gray":
        return _jpeg(im.convert("L")), size
    if kind == "palette":
        buf = io.BytesIO()
        im.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
        return buf.getvalue(), size
    if kind == "16bit":
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue(), size
    if kind == "rgba":
        buf = io.BytesIO()
        im.convert("RGBA").save(buf, "PNG")
        return buf.getvalue(), size
    if kind == "tiny_1xN":
        return _jpeg(im.resize((1, size[1]))), (1, size[1])
    if kind == "png_named_jpg":
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue(), size
    return _jpeg(im), size  # sidecar kinds keep a good image


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def make_sa1b_tar(
    path: str | Path,
    ids: list[int],
    size: tuple[int, int] | Callable[[int], tuple[int, int]] = (240, 160),
    seed: int = 0,
    dot_prefix: bool = False,
    bad: dict[int, str] | None = None,
    extras: bool = False,
) -> Path:
    """An SA-1B-layout tar; ``extras`` adds members a reader must ignore (dirs, links, ``../``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "./" if dot_prefix else ""
    bad = bad or {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        if extras:
            d = tarfile.TarInfo(f"{prefix}subdir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for i in ids:
            wh = size(i) if callable(size) else size
            kind = bad.get(i)
            data, (w, h) = _image_bytes(i, wh, seed, kind)
            _add(tf, f"{prefix}sa_{i}.jpg", data)
            sidecar = {"image": {"image_id": i, "width": w, "height": h, "file_name": f"sa_{i}.jpg"}, "annotations": []}
            if kind == "sidecar_mismatch":
                sidecar["image"]["width"] = w + 7
            if kind == "sidecar_missing":
                continue
            body = b"{not json" if kind == "sidecar_malformed" else json.dumps(sidecar).encode()
            _add(tf, f"{prefix}sa_{i}.json", body)
        if extras:
            for name, kind in (("../sa_999991.jpg", None), ("/abs/sa_999992.jpg", None), ("notes.txt", None)):
                _add(tf, name, b"x" * 10)
            for name, typ in (("sa_999993.jpg", tarfile.SYMTYPE), ("sa_999994.jpg", tarfile.LNKTYPE)):
                link = tarfile.TarInfo(name)
                link.type = typ
                link.linkname = "/etc/passwd"
                tf.addfile(link)
    return path


def make_sa1b_source(
    directory: str | Path, n_tars: int = 2, per_tar: int = 4, size: tuple[int, int] = (240, 160), seed: int = 0
) -> list[Path]:
    """``sa_000000.tar``… with consecutive image ids from 1, like SA-1B."""
    directory = Path(directory)
    return [
        make_sa1b_tar(directory / f"sa_{t:06d}.tar", list(range(1 + t * per_tar, 1 + (t + 1) * per_tar)), size, seed)
        for t in range(n_tars)
    ]
