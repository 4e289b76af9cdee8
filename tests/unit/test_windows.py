"""The sliding-window teacher against a brute-force reference written here, independently of windows.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spar_pipeline.backbones import build
from spar_pipeline.windows import sliding_features, sliding_features_many, upsample_factor, window_starts

P, K = 16, 64


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: thread hand-offs would cost more than the math
    yield build("tiny-siglip")
    torch.set_num_threads(threads)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _reference(backbone, x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """The teacher rule (docs/reference.md, "Teacher: windows and stitching") by brute force: every
    window alone, then per canvas cell the plain average of the ×r-upsampled windows that cover
    it, then back to the patch grid."""
    H, W = x.shape[-2:]
    r = next(r for r in range(1, P + 1) if P % r == 0 and stride % (P // r) == 0)

    def starts(length: int) -> list[int]:
        k = min(window, length)
        return sorted(set(range(0, length - k + 1, stride)) | {length - k})

    kh, kw = min(window, H), min(window, W)
    ups = []  # (cell top, cell left, upsampled map [C, rkh/P, rkw/P])
    for top in starts(H):
        for left in starts(W):
            with torch.no_grad():
                f = backbone.dense(x[..., top:top + kh, left:left + kw])[0].permute(2, 0, 1)[None]
            f = F.interpolate(f, scale_factor=r, mode="bilinear", align_corners=False) if r > 1 else f
            ups.append((top * r // P, left * r // P, f[0]))
    C = ups[0][2].shape[0]
    canvas = torch.zeros(C, H * r // P, W * r // P)
    for y in range(canvas.shape[1]):
        for xx in range(canvas.shape[2]):
            covering = [f[:, y - t, xx - l] for t, l, f in ups
                        if t <= y < t + f.shape[1] and l <= xx < l + f.shape[2]]
            if covering:  # a stride beyond the window leaves uncovered cells: they stay 0 (sum / max(count, 1))
                canvas[:, y, xx] = torch.stack(covering).mean(0)
    if r == 2:  # an exact 2× bilinear downsample is 2×2 average pooling
        canvas = F.avg_pool2d(canvas[None], 2)[0]
    else:
        assert r == 1
    return canvas.permute(1, 2, 0)


def test_window_starts_and_factor():
    assert window_starts(112, 64, 24) == [0, 24, 48]
    assert window_starts(120, 64, 24) == [0, 24, 48, 56]
    assert window_starts(120, 64, 256) == [0, 56]
    assert window_starts(64, 64, 24) == [0]
    assert window_starts(48, 64, 24) == [0]  # side shorter than the window: one window of that side
    assert [upsample_factor(16, s) for s in (8, 16, 24, 32, 48, 256, 4, 12)] == [2, 1, 2, 1, 1, 1, 4, 4]
    with pytest.raises(ValueError):
        window_starts(64, 64, 0)


@pytest.mark.parametrize("stride", [8, 16, 24, 32, 48, 256])
def test_stitching_matches_brute_force(tiny, stride):
    x = _image(96, 128, seed=stride)
    got = sliding_features(tiny, x, K, stride, batch=4)
    want = _reference(tiny, x, K, stride)
    assert got.shape == (6, 8, tiny.dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("stride", [16, 32, 256])
@pytest.mark.parametrize("size", [(64, 64), (48, 48), (32, 48)])
def test_whole_image_window_is_single_pass(tiny, stride, size):
    x = _image(*size)
    with torch.no_grad():
        single = tiny.dense(x)[0]
    torch.testing.assert_close(sliding_features(tiny, x, K, stride), single, atol=1e-5, rtol=1e-5)


def test_single_window_with_r2_is_1_8_3_4_1_8_smoothing(tiny):
    """s=24 → r=2: bilinear ×2 then ÷2 turns one window into a [1/8, 3/4, 1/8] smoothing per axis
    (border replicated) — the reference behaviour, kept on purpose."""
    x = _image(64, 64, seed=3)
    with torch.no_grad():
        f = tiny.dense(x)[0].permute(2, 0, 1)[None]  # [1, C, 4, 4]
    C = f.shape[1]
    k = torch.tensor([1 / 8, 3 / 4, 1 / 8])
    g = F.conv2d(F.pad(f, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3).expand(C, 1, 1, 3), groups=C)
    g = F.conv2d(F.pad(g, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1).expand(C, 1, 3, 1), groups=C)
    got = sliding_features(tiny, x, K, 24)
    torch.testing.assert_close(got, g[0].permute(1, 2, 0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, f[0].permute(1, 2, 0), atol=1e-3)  # it really smooths


@pytest.mark.parametrize("size", [(80, 112), (48, 208), (208, 48), (16, 16), (144, 80)])
def test_odd_grids(tiny, size):
    x = _image(*size)
    for stride in (24, 16):
        out = sliding_features(tiny, x, K, stride)
        assert out.shape == (size[0] // P, size[1] // P, tiny.dim)
        assert torch.isfinite(out).all()


def test_many_equals_per_image(tiny):
    sizes = [(112, 144), (64, 64), (80, 112), (48, 96), (112, 144)]
    images = [_image(h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    many = sliding_features_many(tiny, images, K, 24, batch=7)  # batches mix windows of several images
    for img, got in zip(images, many):
        torch.testing.assert_close(got, sliding_features(tiny, img[None], K, 24, batch=3), atol=2e-5, rtol=1e-4)


def test_canvas_stays_float32_under_autocast(tiny):
    x = _image(96, 96)
    out = sliding_features(tiny, x, K, 24, autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sliding_features(tiny, x, K, 24), atol=0.1, rtol=0.1)


def test_not_a_multiple_of_the_patch_raises(tiny):
    with pytest.raises(ValueError, match="multiple of the patch"):
        sliding_features(tiny, _image(70, 64), K, 24)
