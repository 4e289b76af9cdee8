"""FeatureStore: real Zarr v3 on disk and on a moto S3 server; damage is detected, not trusted."""

from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

import numpy as np
import pytest

from spar_pipeline.store import CODECS, FeatureStore, MapMissing, StoreError, StoreNotFound, map_checksum

FP = {"backbone": "tiny-siglip", "weights": "00", "digest": "d1"}
SHAPE = (5, 7, 16)


def _map(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(np.float16)


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "f.zarr")
    return f"{request.getfixturevalue('s3_bucket')}/run/features.zarr"


def _s3_object(url: str, key: str) -> tuple[str, str]:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    return bucket, f"{prefix}/{key}"


def _put_raw(url: str, key: str, data: bytes) -> None:
    """Overwrite one stored object behind the store's back."""
    if url.startswith("s3://"):
        import os

        import boto3

        bucket, k = _s3_object(url, key)
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(Bucket=bucket, Key=k, Body=data)
    else:
        (Path(url) / key).write_bytes(data)


def _get_raw(url: str, key: str) -> bytes:
    if url.startswith("s3://"):
        import os

        import boto3

        bucket, k = _s3_object(url, key)
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        return client.get_object(Bucket=bucket, Key=k)["Body"].read()
    return (Path(url) / key).read_bytes()


def test_round_trip(url):
    st = FeatureStore.create(url, FP)
    arr = _map(0)
    checksum = st.write(11, arr, {"seconds": 1.5})
    assert checksum == map_checksum(arr) and len(checksum) == 32
    again = FeatureStore.open(url, fingerprint=FP)
    got = again.read(11)
    assert got.dtype == np.float16 and got.shape == SHAPE
    np.testing.assert_array_equal(got, arr)
    assert again.exists(11) and not again.exists(12)
    assert again.verify(11, SHAPE, checksum) is None
    assert again.fingerprint == FP
    assert 0 < again.nbytes_stored(11)
    assert FeatureStore.create(url, FP).read(11).shape == SHAPE  # same fingerprint: create just opens


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip(codec, tmp_path):
    url = str(tmp_path / "f.zarr")
    FeatureStore.create(url, FP, codec=codec, level=1)
    st = FeatureStore.open(url)  # the codec is the store's, recorded at create
    assert (st.codec, st.level) == (codec, 1)
    a = _map(4, (6, 9, 32))
    st.write(4, a)
    np.testing.assert_array_equal(st.read(4), a)


def test_unknown_codec_lists_choices(tmp_path):
    with pytest.raises(StoreError, match="available: blosc, zstd"):
        FeatureStore.create(str(tmp_path / "f.zarr"), FP, codec="lzma")
    assert not (tmp_path / "f.zarr").exists()


def test_other_fingerprint_refused(url):
    FeatureStore.create(url, FP)
    other = dict(FP, digest="d2", stride=16)
    with pytest.raises(StoreError, match=r"another teacher \(differs in: digest, stride\)"):
        FeatureStore.create(url, other)
    with pytest.raises(StoreError, match="digest"):
        FeatureStore.open(url, fingerprint=other)
    assert FeatureStore.open(url).fingerprint == FP  # nothing was rewritten


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreNotFound, match="no feature store"):
        FeatureStore.open(str(tmp_path / "nope.zarr"))
    assert not (tmp_path / "nope.zarr").exists()  # opening does not create
    with pytest.raises(FileNotFoundError):  # StoreNotFound is also a FileNotFoundError
        FeatureStore.open(f"file://{tmp_path}/nope.zarr")


def test_errors_show_no_credentials(s3_bucket):
    secret = "sEcReT-do-not-show"
    url = f"{s3_bucket}/run/features.zarr"
    with pytest.raises(StoreNotFound) as e:
        FeatureStore.open(url, storage_options={"key": "AKIAFAKE", "secret": secret})
    assert secret not in str(e.value) and url in str(e.value)
    st = FeatureStore.create(url, FP, storage_options={"key": "AKIAFAKE", "secret": secret})
    with pytest.raises(MapMissing) as e:
        st.read(5)
    assert secret not in str(e.value) + repr(st)
    from spar_pipeline.fsutil import redact  # what the store's messages pass URLs through

    shown = redact(f"s3://AKIAFAKE:{secret}@bucket/f.zarr?X-Amz-Signature=abc")
    assert secret not in shown and "abc" not in shown and "bucket/f.zarr" in shown


def test_missing_map_is_store_and_key_error(tmp_path):
    st = FeatureStore.create(str(tmp_path / "f.zarr"), FP)
    for kind in (StoreError, KeyError):
        with pytest.raises(kind, match="image 12: no map"):
            st.read(12)


def _writer(url: str, ids: list[int]) -> None:
    st = FeatureStore.open(url, fingerprint=FP)
    for i in ids:
        st.write(i, _map(i))


def test_concurrent_writers_both_land_and_root_untouched(url):
    FeatureStore.create(url, FP)
    root_meta = {k: _get_raw(url, k) for k in ("zarr.json", "maps/zarr.json")}
    local = not url.startswith("s3://")
    mtimes = {k: (Path(url) / k).stat().st_mtime_ns for k in root_meta} if local else {}
    n = 24 if local else 12
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, list(range(k, n, 2)))) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    st = FeatureStore.open(url, fingerprint=FP)
    assert [i for i in range(n) if st.verify(i, SHAPE, map_checksum(_map(i))) is not None] == []
    assert {k: _get_raw(url, k) for k in root_meta} == root_meta  # group metadata never rewritten
    if local:
        assert {k: (Path(url) / k).stat().st_mtime_ns for k in root_meta} == mtimes


def test_rewrite_is_idempotent_and_never_absent(tmp_path):
    st = FeatureStore.create(str(tmp_path / "f.zarr"), FP)
    a = _map(3)
    c = st.write(3, a)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(map_checksum(st.read(3)))
            except Exception as e:  # noqa: BLE001 - any failure is what the test looks for
                seen.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(30):
            assert st.write(3, a) == c
    finally:
        stop.set()
        t.join()
    assert seen and set(seen) == {c}  # a reader during redos always saw the whole map
    b = _map(4)
    assert st.write(3, b) == map_checksum(b)  # a redo with other values replaces them
    np.testing.assert_array_equal(st.read(3), b)
    st.write(3, _map(5, (2, 3, 16)))  # another shape replaces the array
    assert st.read(3).shape == (2, 3, 16)


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_verify_detects_damage(url, codec):
    st = FeatureStore.create(url, FP, codec=codec)
    a = _map(1)
    c = st.write(1, a)
    assert st.verify(1, (5, 8, 16), c) == "shape (5, 7, 16) != (5, 8, 16)"
    assert st.verify(1, SHAPE, "0" * 32) == "checksum mismatch"
    assert st.verify(2, SHAPE, c) == "missing"
    _put_raw(url, "maps/1/c/0/0/0", b"garbage" * 10)
    assert st.verify(1, SHAPE, c).startswith("unreadable: ")
    assert "\n" not in st.verify(1, SHAPE, c)
    st.delete(1)
    assert not st.exists(1) and st.verify(1, SHAPE, c) == "missing"


@pytest.mark.parametrize("codec", CODECS)
def test_bit_flip_in_chunk_detected(tmp_path, codec):
    url = str(tmp_path / "f.zarr")
    st = FeatureStore.create(url, FP, codec=codec)
    c = st.write(1, _map(1))
    chunk = Path(url) / "maps/1/c/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    assert st.verify(1, SHAPE, c) is not None  # zstd frame checksum, else the map checksum


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_cut_write_reads_as_missing(tmp_path, codec):
    """Metadata written, chunk not (a kill between the two puts): missing, never zeros."""
    url = str(tmp_path / "f.zarr")
    st = FeatureStore.create(url, FP, codec=codec)
    c = st.write(7, _map(7))
    (Path(url) / "maps/7/c/0/0/0").unlink()
    assert not st.exists(7)
    with pytest.raises(MapMissing, match="image 7"):
        st.read(7)
    assert st.verify(7, SHAPE, c) == "missing chunk"
    assert st.write(7, _map(7)) == c and st.verify(7, SHAPE, c) is None  # the redo repairs it


def test_per_map_attributes(tmp_path):
    import json

    url = str(tmp_path / "f.zarr")
    st = FeatureStore.create(url, FP)
    st.write(9, _map(9), {"seconds": 0.5})
    attrs = json.loads((Path(url) / "maps/9/zarr.json").read_text())["attributes"]
    assert attrs == {"image_id": 9, "fingerprint": "d1", "seconds": 0.5}


def test_bad_shape_refused(tmp_path):
    st = FeatureStore.create(str(tmp_path / "f.zarr"), FP)
    with pytest.raises(StoreError, match=r"\[h, w, D\]"):
        st.write(1, np.zeros((3, 4), np.float16))


def _features(seed: int, shape=(6, 9, 32)) -> np.ndarray:
    """Feature-like: a channel scale per dimension (some channels 30× others) and one outlier pixel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape[-1])
    x[2, 3] *= 6
    return x.astype(np.float16)


@pytest.mark.parametrize("codec", ["blosc", "none"])
def test_int8_maps_half_the_bytes_small_error(url, codec):
    """int8 with a per-channel scale: read back as float16 close to the original; the checksum is
    of the map read back (so verify holds); the chunk is about half of float16's."""
    st16 = FeatureStore.create(url + "16", FP, codec="none")
    st = FeatureStore.create(url, FP, codec=codec, dtype="int8")
    assert FeatureStore.open(url).dtype == "int8" and "int8" in repr(st)
    a = _features(1)
    c = st.write(1, a)
    back = st.read(1)
    assert back.dtype == np.float16 and back.shape == a.shape and back.flags.writeable
    assert c == map_checksum(back) and st.verify(1, a.shape, c) is None
    x, y = a.astype(np.float64), back.astype(np.float64)
    rel_mse = ((x - y) ** 2).mean() / (x ** 2).mean()
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    assert rel_mse < 1e-3 and cos.min() > 0.99, (rel_mse, cos.min())
    # the largest magnitude of every channel is exact up to float16 rounding
    idx = np.abs(x).reshape(-1, x.shape[-1]).argmax(0)
    np.testing.assert_allclose(y.reshape(-1, x.shape[-1])[idx, range(x.shape[-1])],
                               x.reshape(-1, x.shape[-1])[idx, range(x.shape[-1])], rtol=1e-3)
    st16.write(1, a)
    if codec == "none":
        ratio = st.nbytes_stored(1) / st16.nbytes_stored(1)
        assert 0.5 < ratio < 0.6, ratio
    assert st.exists(1) and not st.exists(2)


def test_int8_redo_cut_write_and_damage(tmp_path):
    url = str(tmp_path / "q.zarr")
    st = FeatureStore.create(url, FP, codec="none", dtype="int8")
    c = st.write(1, _features(1))
    assert st.write(1, _features(1)) == c  # a redo of the same map: same bytes, same checksum
    c2 = st.write(1, _features(2, (3, 4, 32)))  # another shape replaces the array
    assert st.read(1).shape == (3, 4, 32) and st.verify(1, (3, 4, 32), c2) is None
    (Path(url) / "maps/1/c/0/0").unlink()
    with pytest.raises(MapMissing, match="image 1"):
        st.read(1)
    assert st.verify(1, (3, 4, 32), c2) == "missing chunk"
    st.write(1, _features(2, (3, 4, 32)))
    chunk = Path(url) / "maps/1/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-5])  # truncated
    assert st.verify(1, (3, 4, 32), c2).startswith("unreadable: ") and "damaged" in st.verify(1, (3, 4, 32), c2)
    with pytest.raises(StoreError, match="NaN or Inf"):
        st.write(2, np.full((2, 2, 32), np.inf, np.float16))
    zero = np.zeros((2, 2, 32), np.float16)  # an all-zero channel: scale 1, zeros back
    st.write(3, zero)
    np.testing.assert_array_equal(st.read(3), zero)


def test_uncompressed_read_matches_zarr(url):
    """The direct read of uncompressed chunks returns what zarr itself reads."""
    import zarr

    st = FeatureStore.create(url, FP, codec="none")
    a = _map(3)
    st.write(3, a)
    out = st.read(3)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(out, zarr.open_array(store=st._store, path="maps/3", mode="r")[...])
    _put_raw(url, "maps/3/zarr.json", b"{not json")
    with pytest.raises(StoreError, match="image 3: damaged metadata"):
        st.read(3)


def test_unknown_map_dtype_refused(tmp_path):
    with pytest.raises(StoreError, match="unknown map dtype 'int4'"):
        FeatureStore.create(str(tmp_path / "f.zarr"), FP, dtype="int4")
    assert not (tmp_path / "f.zarr").exists()


def test_dequantize_matches_numpy_bits():
    from spar_pipeline.store import dequantize_int8, quantize_int8

    a = _features(5, (7, 50, 768))  # more rows than one block of the blocked dequantisation
    q, s = quantize_int8(a)
    np.testing.assert_array_equal(dequantize_int8(q, s), (q.astype(np.float32) * s).astype(np.float16))


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_float32_store_keeps_the_teacher_exact(url, codec):
    """store_dtype "float32" (what the reference stores): read returns the very float32 map written,
    the checksum is of those float32 bytes (so verify sees a change float16 would round away), the
    chunk is twice float16's, and a cut write still reads as missing (NaN fill)."""
    st = FeatureStore.create(url, FP, codec=codec, dtype="float32")
    st16 = FeatureStore.create(url + "16", FP, codec=codec)
    assert FeatureStore.open(url).dtype == "float32" and "float32" in repr(st)
    a = _features(1).astype(np.float32) + np.float32(1e-4)  # not representable in float16
    c = st.write(1, a)
    back = st.read(1)
    assert back.dtype == np.float32 and back.flags.writeable
    np.testing.assert_array_equal(back, a)
    assert c == map_checksum(a) != map_checksum(a.astype(np.float16)) and st.verify(1, a.shape, c) is None
    nudged = a.copy()
    nudged[0, 0, 0] = np.nextafter(a[0, 0, 0], np.float32(np.inf))  # one float32 ulp
    st.write(1, nudged)
    assert st.verify(1, a.shape, c) == "checksum mismatch"
    st16.write(1, a)
    assert st16.read(1).dtype == np.float16  # the default store keeps the float16 contract
    if url.startswith("s3://"):
        return
    chunk = lambda u: (Path(u) / "maps/1/c/0/0/0").stat().st_size  # noqa: E731
    if codec == "none":
        assert chunk(url) == a.size * 4 and chunk(url + "16") == a.size * 2
    (Path(url) / "maps/1/c/0/0/0").unlink()
    with pytest.raises(MapMissing):
        st.read(1)


@pytest.mark.slow
def test_float32_recipe_extracts_float32_maps(tmp_path):
    """[extract] store_dtype = "float32": extract writes the teacher as computed (no float16
    rounding), the teacher fingerprint says float32, and a float16 run's store is refused for it."""
    from spar_pipeline import extract
    from spar_pipeline.resources import stages_dir

    from _extracted import check_done_once, prepare, teacher_by_hand

    text = (stages_dir() / "tiny-cpu.toml").read_text()
    recipe = tmp_path / "f32.toml"
    recipe.write_text(text.replace("images_per_task = 4", 'images_per_task = 4\nstore_dtype = "float32"'))
    run = prepare(str(tmp_path / "run"), tmp_path / "src", n_tars=1, per_tar=2, recipe=str(recipe))
    extract.run(run, workers=1, progress=False)
    rows = check_done_once(run)
    store = FeatureStore.open(run.teacher().store_url)
    assert store.dtype == "float32" and store.fingerprint["dtype"] == "float32"
    first = rows[0]["image_id"]
    got, ref = store.read(first), teacher_by_hand(run, first)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.abs(got - ref).max() < np.abs(ref.astype(np.float16).astype(np.float32) - ref).max()
    other = dict(store.fingerprint, dtype="float16")
    with pytest.raises(StoreError, match="dtype"):
        FeatureStore.open(run.teacher().store_url, fingerprint=other)
