"""Where a teacher-map read spends its time: plain file, zarr with no codec, zarr with each codec.
Writes bench/results/read.json.

    python -m bench read

One map of the SigLIP2 shape at a 1024×1536 image ([64, 96, 768] float16, 9.4 MB), read again
and again from the page cache; medians. Shows that the gap to plain files is decoding (codecs; zarr's
own copies too, which the store skips for uncompressed maps), not I/O; and what int8 maps cost to
turn back into float16.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zarr

from bench.common import median_time, save
from spar_pipeline.store import FeatureStore


def main(quick: bool = False) -> dict:
    shape = (32, 48, 768) if quick else (64, 96, 768)
    repeats = 7 if quick else 21
    arr = (np.random.default_rng(0).standard_normal(shape) * 0.5).astype(np.float16)
    out: dict = {"shape": list(shape), "mb": arr.nbytes / 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "map.bin"
        arr.tofile(plain)
        out["plain_ms"] = 1e3 * median_time(lambda: np.fromfile(plain, dtype=np.float16), repeats)
        for codec, dtype in (("none", "float16"), ("blosc", "float16"), ("zstd", "float16"), ("none", "int8")):
            label = codec if dtype == "float16" else f"{dtype}-{codec}"
            store = FeatureStore.create(f"{tmp}/{label}.zarr", {"digest": "bench"}, codec=codec, dtype=dtype)
            store.write(1, arr)
            assert dtype != "float16" or np.array_equal(store.read(1), arr)
            ms = 1e3 * median_time(lambda: store.read(1), repeats)
            out[f"{label}_ms"] = ms
            out[f"{label}_vs_plain"] = out["plain_ms"] / ms
            print(f"read {label:>10}: {ms:6.2f} ms   plain file {out['plain_ms']:.2f} ms   ratio {out['plain_ms'] / ms:.2f}×")
        zarr_none = zarr.open_array(f"{tmp}/none.zarr/maps/1", mode="r")  # zarr's own path, for the record
        out["zarr_itself_none_ms"] = 1e3 * median_time(lambda: zarr_none[...], repeats)
        print(f"zarr's own read of the uncompressed map: {out['zarr_itself_none_ms']:.2f} ms")
    return save("read", out)
