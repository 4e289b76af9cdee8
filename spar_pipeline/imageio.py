"""The one image decode every stage uses: bytes in, 8-bit RGB out, or a clear rejection."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

__all__ = ["ImageRejected", "decode_image", "image_size"]


class ImageRejected(ValueError):
    """The bytes are not a usable image; the message is the reason recorded in the manifest."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # PIL raises many types for junk
        raise ImageRejected(f"not an image ({type(e).__name__})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, L, LA, RGBA, YCbCr ...
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB of raw pixels (no EXIF rotation, as the reference loads them)."""
    if not data:
        raise ImageRejected("empty file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None  # our own limit below gives the clearer message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageRejected(f"decompression bomb: {w}×{h} = {w * h} pixels > limit {max_pixels}")
            if min(w, h) < 2:
                raise ImageRejected(f"degenerate size {w}×{h}")
            im.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        if "truncated" in msg.lower() or "premature" in msg.lower():
            raise ImageRejected(f"truncated image ({msg})") from None
        raise ImageRejected(f"corrupt image ({msg})") from None
    rgb = _to_rgb(im)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageRejected(f"unsupported pixel layout {im.mode}")
    return np.ascontiguousarray(rgb)
