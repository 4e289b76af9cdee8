"""The one decode: 8-bit RGB out of every odd-but-valid image, a clear rejection for the rest."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from spar_pipeline.imageio import ImageRejected, decode_image, image_size
from spar_pipeline.mini.sa1b_writer import ACCEPTED_KINDS, REJECTED_KINDS, _image_bytes, synthetic_image

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
LIMIT = 89478485
SIZE = (64, 48)  # W, H
IMAGE_KINDS = [k for k in REJECTED_KINDS if not k.startswith("sidecar_")]


def _bytes(kind, size=SIZE):
    return _image_bytes(7, size, 0, kind)[0]


def _png(arr_or_im, **kw) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_jpeg_decodes_to_uint8_rgb():
    out = decode_image(_bytes(None), LIMIT)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3) and out.flags.c_contiguous
    ref = np.asarray(synthetic_image(7, SIZE), dtype=np.float32)
    assert np.abs(out.astype(np.float32) - ref).mean() < 8  # JPEG at quality 90, chroma subsampled
    assert out.std() > 10  # structured, not flat


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_bad_image_is_rejected_with_reason(kind):
    with pytest.raises(ImageRejected) as e:
        decode_image(_bytes(kind), LIMIT)
    assert REJECTED_KINDS[kind] in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("kind", [k for k in ACCEPTED_KINDS if not k.startswith("sidecar_")])
def test_odd_image_is_accepted_as_rgb(kind):
    out = decode_image(_bytes(kind), LIMIT)
    if kind == "exif_rotated":  # orientation 6 is decoded turned 90° clockwise: turn it back to compare
        out = np.rot90(out, 1)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    ref = np.asarray(synthetic_image(7, SIZE).convert("L" if kind in ("gray", "16bit", "la") else "RGB"), np.float32)
    got = out[..., 0].astype(np.float32) if ref.ndim == 2 else out.astype(np.float32)
    tolerance = {"cmyk": 14, "palette": 14, "palette_transparent": 14}.get(kind, 8)
    assert np.abs(got - ref).mean() < tolerance, kind


def test_16bit_is_scaled_not_clipped():
    gray = np.asarray(synthetic_image(3, SIZE).convert("L"), dtype=np.uint16)
    out = decode_image(_png(gray * 257), LIMIT)  # I;16 PNG, full 16-bit range
    assert Image.open(io.BytesIO(_png(gray * 257))).mode.startswith("I;16")
    np.testing.assert_array_equal(out[..., 0], gray)
    assert (out[..., 0] == out[..., 2]).all()
    ramp = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    out = decode_image(_png(ramp), LIMIT)[..., 0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200  # a ramp, not a clip at 255


def test_32bit_int_mode_is_scaled():
    arr = np.linspace(0, 65535, 64 * 48).astype(np.int32).reshape(48, 64)
    buf = io.BytesIO()
    Image.fromarray(arr, "I").save(buf, "TIFF")
    out = decode_image(buf.getvalue(), LIMIT)[..., 0]
    assert out.max() == 255 and out[0, 0] == 0 and len(np.unique(out)) > 200


def test_palette_with_transparency_keeps_palette_colours():
    im = synthetic_image(5, SIZE).convert("P", palette=Image.Palette.ADAPTIVE)
    out = decode_image(_png(im, transparency=0), LIMIT)
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGBA").convert("RGB")))


def test_exif_orientation_is_applied():
    data = _bytes("exif_rotated")
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # PIL leaves JPEG pixels as stored
    assert raw.shape == (48, 64, 3)
    np.testing.assert_array_equal(decode_image(data, LIMIT), np.rot90(raw, -1))  # 90° clockwise: 48 wide, 64 high
    assert image_size(data) == (48, 64)


def _with_orientation(fmt: str, value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    buf = io.BytesIO()
    synthetic_image(4, (40, 24)).save(buf, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_orientation_as_opencv_and_the_benchmark_decode(tmp_path, fmt):
    """The reference decodes with OpenCV's IMREAD_COLOR, which applies EXIF orientation. Both decode paths
    (this one, and the benchmarks' cv2 decode in datasets.load_image) turn the pixels through imageio.orient."""
    import cv2

    from spar_pipeline.datasets import load_image

    for value in range(1, 9):
        data = _with_orientation(fmt, value)
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]  # OpenCV's own turn
        path = tmp_path / f"{value}.img"
        path.write_bytes(data)
        np.testing.assert_array_equal(load_image(path), want, err_msg=f"{fmt} {value}")
        got = decode_image(data, LIMIT)
        assert got.shape == want.shape == ((40, 24, 3) if value >= 5 else (24, 40, 3)), (fmt, value)
        assert image_size(data) == (got.shape[1], got.shape[0])
        if fmt == "JPEG":  # PIL's and OpenCV's JPEG decoders may differ by a grey level; the turn may not
            assert np.abs(got.astype(int) - want).mean() < 2, value
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{fmt} {value}")


def test_bomb_is_refused_from_the_header(monkeypatch):
    data = _bytes("bomb_soft")  # 10000×9000 declared by a ~2 kB file
    assert image_size(data) == (10000, 9000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageRejected, match="decompression bomb: 10000×9000"):
        decode_image(data, LIMIT)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(_bytes(None), max_pixels=64 * 48 - 1)


def test_truncated_is_rejected_even_if_someone_allows_truncation(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageRejected, match="truncated"):
        decode_image(_bytes("truncated"), LIMIT)


def test_image_size_reads_the_header_only():
    assert image_size(_bytes(None, (240, 160))) == (240, 160)
    assert image_size(_bytes("truncated", (240, 160))) == (240, 160)  # the header is intact
    t = time.perf_counter()
    with pytest.raises(ImageRejected, match="decompression bomb"):  # 3.6 Gpx: past PIL's own hard limit
        image_size(_bytes("bomb"))
    assert time.perf_counter() - t < 1
    for kind in ("empty", "not_image", "eps"):
        with pytest.raises(ImageRejected):
            image_size(_bytes(kind))


def test_two_pixel_sides_are_fine():
    arr = np.zeros((2, 2, 3), np.uint8)
    assert decode_image(_png(arr), LIMIT).shape == (2, 2, 3)
