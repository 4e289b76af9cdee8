"""Feature store: write/read throughput of FeatureStore against plain files holding the same bytes
(``ndarray.tofile`` / ``np.fromfile``), and stored bytes per map against raw float16, per codec and
map dtype (float16, the reference's float32, int8). Goals (issue 4): read ≥ 0.8× plain, ≤ 0.9× raw
bytes lossless. Then the error the float16 default makes against float32 maps of a real teacher:
mini-clip's (shipped weights) sliding-window maps of generated scenes (window 64, stride 8, as the
``mini`` recipe), next to how far the pretrained single pass is from that teacher (the error
training works on). Prints tables and writes bench/results/store.json.

    python bench/bench_store.py [--quick]      (or: python -m bench store)

The maps are synthetic but shaped like teacher features: a spatially smooth low-rank field
(bilinearly upsampled from a coarse grid) mixed into D channels, plus a little noise, cast to
float16. Everything runs on the local disk in a temporary folder, without fsync on either side.
Reads are timed twice: from the page cache, and cold (files evicted with posix_fadvise first).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make spar_pipeline importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median_time, save  # noqa: E402
from spar_pipeline.store import FeatureStore  # noqa: E402

# (label, FeatureStore codec, level, map dtype): the default first, then the alternatives measured.
VARIANTS = [
    ("blosc-zstd-3-bitshuffle", "blosc", 3, "float16"),
    ("blosc-zstd-1-bitshuffle", "blosc", 1, "float16"),
    ("zstd-3", "zstd", 3, "float16"),
    ("zstd-1", "zstd", 1, "float16"),
    ("zstd-9", "zstd", 9, "float16"),
    ("blosc-zstd-3-shuffle", "blosc-shuffle", 3, "float16"),
    ("blosc-lz4-5-shuffle", "blosc-lz4", 5, "float16"),
    ("none", "none", 0, "float16"),
    ("float32-none", "none", 0, "float32"),  # what the reference stores
    ("float32-blosc-zstd-3-bitshuffle", "blosc", 3, "float32"),
    ("int8-none", "none", 0, "int8"),  # lossy: error in bench/bench_quant.py
    ("int8-blosc-zstd-3-shuffle", "blosc-shuffle", 3, "int8"),
]


def feature_maps(n: int, h: int, w: int, dim: int, rank: int = 48, noise: float = 0.1, seed: int = 0,
                 dtype=np.float16) -> list:
    """Smooth low-rank [h, w, dim] maps (float16 unless ``dtype``) with small i.i.d. noise (std of the signal ≈ 1)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    out = []
    for _ in range(n):
        coarse = rng.standard_normal((h // 8 + 2, w // 8 + 2, rank)).astype(np.float32)
        ys, xs = np.linspace(0, coarse.shape[0] - 1.001, h), np.linspace(0, coarse.shape[1] - 1.001, w)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        c = coarse
        field = ((1 - fy) * ((1 - fx) * c[y0][:, x0] + fx * c[y0][:, x0 + 1])
                 + fy * ((1 - fx) * c[y0 + 1][:, x0] + fx * c[y0 + 1][:, x0 + 1]))
        x = field @ mix + noise * rng.standard_normal((h, w, dim)).astype(np.float32)
        out.append(x.astype(dtype))
    return out


def teacher_error(n: int = 8, size: tuple[int, int] = (384, 288), stride: int = 8) -> dict:
    """float16 against float32 on real teacher maps: mini-clip's sliding-window maps of ``n``
    generated scenes (``size`` W×H), computed in float32. ``single_pass_mse`` is the pretrained
    single pass against the same teacher: the error the student is trained to remove."""
    import torch

    from spar_pipeline.backbones import build
    from spar_pipeline.mini.scenes import make_scene
    from spar_pipeline.windows import sliding_features

    b = build("mini-clip").eval()
    sq_err = power = single = 0.0
    worst_abs = 0.0
    cos_min = 1.0
    shape = None
    for i in range(n):
        img = torch.from_numpy(make_scene(0, i, size).image).permute(2, 0, 1)[None].float() / 255.0
        x = b.normalize(img)
        with torch.no_grad():
            t32 = sliding_features(b, x, b.window, stride, batch=64).numpy().astype(np.float32)
            one = b.dense(x)[0].float().numpy()
        err = t32.astype(np.float16).astype(np.float32) - t32
        shape = list(t32.shape)
        sq_err += float((err.astype(np.float64) ** 2).mean())
        power += float((t32.astype(np.float64) ** 2).mean())
        single += float(((one - t32).astype(np.float64) ** 2).mean())
        worst_abs = max(worst_abs, float(np.abs(err).max()))
        f16 = t32.astype(np.float16).astype(np.float64)
        cos = (f16 * t32).sum(-1) / np.linalg.norm(f16, axis=-1) / np.linalg.norm(t32, axis=-1)
        cos_min = min(cos_min, float(cos.min()))
    return dict(teacher="mini-clip (shipped weights)", images=n, image_size=list(size), stride=stride,
                map_shape=shape, mse=sq_err / n, relative_mse=sq_err / power, max_abs_error=worst_abs,
                max_abs_error_vs_rms=worst_abs / float(np.sqrt(power / n)), cosine_min=cos_min, single_pass_mse=single / n,
                mse_vs_single_pass_mse=sq_err / single)


def _evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (no root needed), so the next read hits the disk."""
    os.sync()
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cold(read, folder: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _evict(folder)
        t = time.perf_counter()
        read()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _plain(maps: list, root: Path, repeats: int) -> dict:
    folder = root / "plain"

    def write():
        _drop(folder)
        folder.mkdir()
        for i, m in enumerate(maps):
            m.tofile(folder / f"{i}.f16")
            # the store's LocalStore writes a temporary file and renames it; give plain files no
            # fsync either, so both sides pay the same (page-cache) price

    def read():
        for i, m in enumerate(maps):
            np.fromfile(folder / f"{i}.f16", dtype=np.float16).reshape(m.shape)

    tw = median_time(write, repeats)
    tr = median_time(read, repeats)
    return dict(write_s=tw, read_s=tr, cold_read_s=_cold(read, folder, repeats))


def _store(maps: list, root: Path, codec: str, level: int, repeats: int, dtype: str = "float16",
           exact: list | None = None) -> dict:
    """``maps`` as written; ``exact``: the float32 maps a float32 store must give back bit for bit."""
    url = str(root / f"store-{codec}-{level}-{dtype}.zarr")
    fp = {"backbone": "bench", "digest": "0" * 16}

    def write():
        _drop(Path(url))
        st = FeatureStore.create(url, fp, codec=codec, level=level, dtype=dtype)
        for i, m in enumerate(maps):
            st.write(i, m)

    st_holder = {}

    def read():
        st = st_holder.setdefault("st", FeatureStore.open(url))
        for i in range(len(maps)):
            st.read(i)

    tw = median_time(write, repeats)
    tr = median_time(read, repeats)
    cold = _cold(read, Path(url), repeats)
    st = FeatureStore.open(url)
    for i, m in enumerate(maps[:2]):
        if dtype == "float32":
            assert np.array_equal(st.read(i), exact[i]), "lossless float32 round trip"
        elif dtype == "float16":
            assert np.array_equal(st.read(i), m), "lossless round trip"
        else:
            np.testing.assert_allclose(st.read(i), m, atol=float(np.abs(m).max()) / 100)
    stored = [st.nbytes_stored(i) for i in range(len(maps))]
    return dict(write_s=tw, read_s=tr, cold_read_s=cold, bytes_per_map=statistics.mean(stored))


def main(quick: bool = False) -> dict:
    n, h, w, dim = (6, 32, 48, 768) if quick else (20, 64, 96, 768)
    repeats = 3 if quick else 5
    maps32 = feature_maps(n, h, w, dim, dtype=np.float32)
    maps = [m.astype(np.float16) for m in maps32]
    raw = maps[0].nbytes
    total_mb = n * raw / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-", dir=os.environ.get("BENCH_TMP")))
    try:
        plain = _plain(maps, tmp, repeats)
        rows = {}
        for label, codec, level, dtype in VARIANTS:
            r = _store(maps32 if dtype == "float32" else maps, tmp, codec, level, repeats, dtype, exact=maps32)
            rows[label] = dict(
                codec=codec, level=level, dtype=dtype,
                write_mb_s=total_mb / r["write_s"], read_mb_s=total_mb / r["read_s"],
                cold_read_mb_s=total_mb / r["cold_read_s"],
                read_vs_plain=plain["read_s"] / r["read_s"], cold_read_vs_plain=plain["cold_read_s"] / r["cold_read_s"],
                write_vs_plain=plain["write_s"] / r["write_s"],
                bytes_per_map=int(r["bytes_per_map"]), bytes_vs_raw=r["bytes_per_map"] / raw,
            )
    finally:
        _drop(tmp)
    plain_row = dict(write_mb_s=total_mb / plain["write_s"], read_mb_s=total_mb / plain["read_s"],
                     cold_read_mb_s=total_mb / plain["cold_read_s"])

    print(f"{n} maps of [{h},{w},{dim}] float16 ({raw / 1e6:.2f} MB raw each), median of {repeats}, "
          f"local disk, {os.cpu_count()} CPUs")
    print("MB/s of raw float16; 'cached' reads come from the page cache, 'cold' ones from disk (evicted first)")
    print(f"{'variant':24s} {'write':>6s} {'w/plain':>7s} {'cached':>7s} {'c/plain':>7s} {'cold':>6s} "
          f"{'cold/plain':>10s} {'bytes/map':>10s} {'vs raw':>6s}")
    print(f"{'plain tofile/fromfile':24s} {plain_row['write_mb_s']:6.0f} {1.0:7.2f} {plain_row['read_mb_s']:7.0f} "
          f"{1.0:7.2f} {plain_row['cold_read_mb_s']:6.0f} {1.0:10.2f} {raw:10d} {1.0:6.3f}")
    for label, r in rows.items():
        print(f"{label:24s} {r['write_mb_s']:6.0f} {r['write_vs_plain']:7.2f} {r['read_mb_s']:7.0f} "
              f"{r['read_vs_plain']:7.2f} {r['cold_read_mb_s']:6.0f} {r['cold_read_vs_plain']:10.2f} "
              f"{r['bytes_per_map']:10d} {r['bytes_vs_raw']:6.3f}")
    err = teacher_error(n=2, size=(256, 192)) if quick else teacher_error(n=8)
    print(f"float16 against float32 teacher maps ({err['teacher']}, {err['images']} scenes of "
          f"{err['image_size'][0]}×{err['image_size'][1]}, stride {err['stride']}, maps {err['map_shape']}): "
          f"relative MSE {err['relative_mse']:.2e}, max |error| {err['max_abs_error']:.2e} "
          f"({err['max_abs_error_vs_rms']:.2e} of the maps' RMS), cosine ≥ {err['cosine_min']:.7f}; "
          f"the pretrained single pass is {err['single_pass_mse']:.3g} MSE from the teacher, "
          f"{1 / err['mse_vs_single_pass_mse']:.2e}× the float16 error")
    return save("store", dict(
        python=platform.python_version(), cpus=os.cpu_count(), quick=quick,
        maps=n, shape=[h, w, dim], raw_bytes_per_map=raw, repeats=repeats,
        data="smooth low-rank (rank 48, 8x bilinear upsampling) + 0.1 noise, made in float32, stored as each dtype",
        plain=plain_row, store=rows, float16_vs_float32=err,
        goals={"read_vs_plain": ">= 0.8", "bytes_vs_raw": "<= 0.9 lossless"},
    ))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
