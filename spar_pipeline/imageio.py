"""The one image decode every stage uses: bytes in, 8-bit RGB out, or a clear rejection.

Pixels as displayed: the EXIF orientation is applied, as the reference's OpenCV decode
(``IMREAD_COLOR``) applies it, and :func:`orient` is the one transform every decode path uses
(the benchmarks' OpenCV decode too). Only still-image formats a tar of photos can sensibly hold
are opened (never EPS/PostScript, which would run Ghostscript). The pixel limit is checked from
the header, before a byte is decompressed.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from spar_pipeline.errors import ImageRejected, first_line

__all__ = ["ImageRejected", "decode_image", "image_size", "orient", "orientation", "FORMATS"]

# Formats we open; anything else is "not an image" (JPEG covers multi-picture MPO files too).
FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF")

# Our own limit (recipe.ingest.max_pixels) is checked before decoding and gives the clearer
# message; PIL's warning between its soft and hard limits would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageRejected("empty file")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"decompression bomb ({first_line(e).split(',')[0]})") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"not an image (no {'/'.join(FORMATS[:3])}/... header)") from None
    except Exception as e:  # PIL raises many types on damaged headers
        msg = first_line(e)
        what = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageRejected(f"{what} image header ({msg})") from None


_ORIENTATION_TAG = 0x0112


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1–8) still to apply to an opened image's pixels; 1 when absent or
    invalid, and for TIFF, whose readers (PIL's and OpenCV's) apply it themselves."""
    if im.format == "TIFF":
        return 1
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: OpenCV ignores it too
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orientation(data: bytes) -> int:
    """The EXIF orientation :func:`orient` applies to these bytes' raw pixels (header only; 1 if none)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            return _orientation(im)
    except Exception:  # not an image PIL opens: the caller's decoder gives the error
        return 1


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """[H, W, ...] raw pixels turned as displayed: EXIF orientation 1–8, the transforms OpenCV's
    IMREAD_COLOR applies (2 mirror, 3 turn 180°, 4 flip, 5 transpose, 6 turn 90° clockwise,
    7 transverse, 8 turn 90° anticlockwise). A view; 1 (or anything else) returns the input."""
    if orientation in (5, 6, 7, 8):
        pixels = pixels.swapaxes(0, 1)
    if orientation in (2, 3, 6, 7):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4, 7, 8):
        pixels = pixels[::-1]
    return pixels


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    with _open(data) as im:
        w, h = im.size
        return (h, w) if _orientation(im) >= 5 else (w, h)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):  # 16-bit: scale 0..65535 onto 0..255 (x/257), never clip
        arr = np.asarray(im).astype(np.float32)
        return _gray_to_rgb(np.round(arr / 257.0).astype(np.uint8))
    if mode == "I":  # 32-bit int container: PIL's holder for 16-bit PNG/TIFF data
        arr = np.clip(np.asarray(im).astype(np.float64), 0, None)
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        return _gray_to_rgb(np.round(arr * (255.0 / scale)).astype(np.uint8))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im).astype(np.float64))
        if arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
        return _gray_to_rgb(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, L, LA, 1, RGBA, YCbCr, HSV ... (alpha dropped, raw colours)
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB as displayed (EXIF orientation applied), or ``ImageRejected`` with the reason."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a short file must fail, never decode as grey
    im = _open(data)
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageRejected(f"decompression bomb: {w}×{h} = {w * h} pixels > limit {max_pixels}")
        if min(w, h) < 2:
            raise ImageRejected(f"degenerate size {w}×{h} (each side must be ≥ 2)")
        try:
            im.load()  # force the full decode: truncation and corrupt data show here
        except Exception as e:
            msg = first_line(e)
            if "truncated" in msg.lower() or "premature" in msg.lower():
                raise ImageRejected(f"truncated {im.format} ({msg})") from None
            raise ImageRejected(f"corrupt {im.format} ({msg})") from None
        try:
            rgb = _to_rgb(im)
        except Exception as e:
            raise ImageRejected(f"unsupported pixel mode {im.mode} ({first_line(e)})") from None
        turn = _orientation(im)
    rgb = orient(rgb, turn)
    if turn >= 5:
        w, h = h, w
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != (h, w):
        raise ImageRejected(f"unsupported pixel layout {im.mode} {rgb.shape}")
    return np.ascontiguousarray(rgb)
