"""FeatureStore: real Zarr v3 on disk and on moto S3; damage is detected, not trusted."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from spar_pipeline.store import FeatureStore, StoreError, map_checksum

FP = {"backbone": "tiny-siglip", "weights": "00", "digest": "d1"}


def _map(seed: int, shape=(5, 7, 16)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(np.float16)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip(where, tmp_path, request):
    url = str(tmp_path / "f.zarr") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run/f.zarr"
    st = FeatureStore.create(url, FP)
    arr = _map(0)
    checksum = st.write(11, arr)
    assert checksum == map_checksum(arr)
    again = FeatureStore.open(url, fingerprint=FP)
    np.testing.assert_array_equal(again.read(11), arr)
    assert again.read(11).dtype == np.float16
    assert again.verify(11, arr.shape, checksum) is None
    assert again.fingerprint == FP and again.nbytes_stored(11) > 0
    with pytest.raises(KeyError, match="image 12"):
        again.read(12)


def test_other_fingerprint_refused(tmp_path):
    url = str(tmp_path / "f.zarr")
    FeatureStore.create(url, FP)
    with pytest.raises(StoreError, match="another teacher.*digest"):
        FeatureStore.create(url, dict(FP, digest="d2"))
    assert FeatureStore.open(url).fingerprint == FP  # nothing was rewritten


def test_open_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature store"):
        FeatureStore.open(str(tmp_path / "nope.zarr"))


def _writer(url: str, ids: list[int]) -> None:
    st = FeatureStore.open(url)
    for i in ids:
        st.write(i, _map(i))


def test_concurrent_writers_both_land(tmp_path):
    url = str(tmp_path / "f.zarr")
    FeatureStore.create(url, FP)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, list(range(k, 40, 2)))) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    st = FeatureStore.open(url, fingerprint=FP)
    for i in range(40):
        assert st.verify(i, (5, 7, 16), map_checksum(_map(i))) is None
    assert st.fingerprint == FP


def test_rewrite_is_idempotent(tmp_path):
    st = FeatureStore.create(str(tmp_path / "f.zarr"), FP)
    a = _map(3)
    assert st.write(3, a) == st.write(3, a)
    np.testing.assert_array_equal(st.read(3), a)


def test_verify_detects_damage(tmp_path):
    url = str(tmp_path / "f.zarr")
    st = FeatureStore.create(url, FP)
    a = _map(1)
    c = st.write(1, a)
    assert st.verify(1, (5, 8, 16), c).startswith("shape")
    assert st.verify(1, a.shape, "0" * 32) == "checksum mismatch"
    assert st.verify(2, a.shape, c) == "missing"
    chunk = next(p for p in (Path(url) / "maps" / "1").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage" * 10)
    assert st.verify(1, a.shape, c).startswith("unreadable")
    st.delete(1)
    assert not st.exists(1)


def test_bad_shape_refused(tmp_path):
    st = FeatureStore.create(str(tmp_path / "f.zarr"), FP)
    with pytest.raises(StoreError, match=r"\[h, w, D\]"):
        st.write(1, np.zeros((3, 4), np.float16))
