"""The teacher feature store: one map per image (float16 by default) in Zarr v3, on any fsspec URL.

Layout: ``features.zarr/`` root group (attributes: fingerprint, layout version, codec; written
once, by ``create``) and ``maps/<image_id>``: one array per image holding a single whole-map
chunk. One array per image means one writer per chunk at all times, and ``write`` only ever
writes ``maps/<id>/zarr.json`` and ``maps/<id>/c/0/0/0``: zarr creates missing parents with
set-if-not-exists, and the parents always exist, so no worker rewrites group metadata.

Completeness: every object is written whole (LocalStore writes a temporary file and renames;
an S3 PUT is atomic). A redo of an image reuses its array and replaces the chunk in one
put, so a reader sees the old map or the new one, never a gap. The array's fill value is NaN
and a stored map never is, so a map whose chunk is absent (a write cut between metadata and
chunk) reads as missing instead of as zeros. Callers never touch zarr directly.

Map dtype (root attribute ``map_dtype``, part of the teacher fingerprint): ``float16`` (the
default), ``float32`` (what the reference stores: twice the bytes, the teacher exactly as
computed; the float16 error against it is measured by bench/bench_store.py), or ``int8`` with a
per-channel scale, about half of float16's bytes (error measured in bench/bench_quant.py). An int8
map is one int8 array ``[4 + h·w, D]``: the first four rows are the little-endian float32 scales'
bytes, the rest the values; its ``map_shape`` attribute holds ``[h, w, D]``. Scales and values
live in one chunk, so a redo is still a single put. ``read`` returns float32 from a float32 store
and float16 from the others (an int8 map is dequantised to float16): a float32 store never loses
the precision it was chosen for, and the other two keep the float16 contract callers rely on.

Reads of uncompressed maps (codec ``none``) skip zarr's codec pipeline: the chunk's bytes are the
array (zarr's path costs ~4.7× a plain file read: bench/bench_read.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError, NodeNotFoundError

from spar_pipeline.errors import MapMissing, StoreError, StoreNotFound, first_line
from spar_pipeline.fsutil import redact, storage_options_for

__all__ = ["CODECS", "MAP_DTYPES", "FeatureStore", "MapMissing", "StoreError", "StoreNotFound", "dequantize_int8",
           "map_checksum", "quantize_int8"]

LAYOUT_VERSION = 1
# "none" (the recipe default) reads as fast as a plain file; "blosc": zstd over bit-shuffled float16,
# the smallest lossless one (bench/bench_store.py: ~0.89x raw, twice zstd's read speed); "zstd" alone
# carries a frame checksum; the rest are measured alternatives.
CODECS = ("blosc", "zstd", "blosc-shuffle", "blosc-lz4", "none")
MAP_DTYPES = ("float16", "float32", "int8")
_SCALE_ROWS = 4  # an int8 map's float32 scales take 4 int8 rows of D


def map_checksum(arr: np.ndarray) -> str:
    """sha256 of the map's C-contiguous bytes as ``read`` returns them (float32 for a float32 map,
    float16 for any other), first 32 hex chars: what the manifest records."""
    dtype = np.float32 if np.asarray(arr).dtype == np.float32 else np.float16
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=dtype)).hexdigest()[:32]


def quantize_int8(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 of an ``[h, w, D]`` map: (values in [-127, 127], float32 scales [D]).
    A channel's scale is its largest magnitude / 127 (1 for an all-zero channel)."""
    x = np.asarray(arr, dtype=np.float32)
    scale = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0) / 127.0
    scale[~(scale > 0)] = 1.0
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float16 map of int8 values times float32 scales. In torch, in blocks under its parallel grain
    (32768 elements), so on one thread: memory-bound, as fast as two on an idle machine, 7x faster
    than two when another process holds the cores, 4x faster than numpy; the same bits as numpy."""
    import torch

    d = q.shape[-1]
    src = torch.from_numpy(np.ascontiguousarray(q)).reshape(-1, d)
    s = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
    out = torch.empty(src.shape, dtype=torch.float16)
    rows = max(1, 32767 // d)
    for i in range(0, src.shape[0], rows):
        out[i:i + rows] = src[i:i + rows].to(torch.float32).mul_(s)
    return out.reshape(q.shape).numpy()


def _pack_int8(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored int8 array [4 + h·w, D], the float16 map it reads back as)."""
    q, scale = quantize_int8(arr)
    d = arr.shape[-1]
    packed = np.concatenate([scale.astype("<f4").view(np.int8).reshape(_SCALE_ROWS, d), q.reshape(-1, d)])
    return packed, dequantize_int8(q, scale)


def _unpack_int8(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    scale = np.ascontiguousarray(packed[:_SCALE_ROWS]).reshape(-1).view("<f4")
    return dequantize_int8(packed[_SCALE_ROWS:].reshape(shape), scale)


def _is_fill(value, fill) -> bool:
    """Whether a first element equals the fill value (NaN for float16 maps; NaN != NaN)."""
    return bool(np.isnan(value)) if isinstance(value, np.floating) else value == fill


_hasher: ThreadPoolExecutor | None = None


def _checksum_async(arr: np.ndarray) -> Future:
    """hashlib drops the GIL on large buffers: hash in a thread while zarr encodes and writes."""
    global _hasher
    if _hasher is None:
        _hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-checksum")
    return _hasher.submit(map_checksum, arr)


def _compressors(codec: str, level: int, typesize: int = 2) -> list:
    if codec == "none":
        return []
    if codec == "zstd":  # the frame checksum makes a damaged chunk fail to decode
        return [ZstdCodec(level=level, checksum=True)]
    if codec in ("blosc", "blosc-shuffle", "blosc-lz4"):  # bit (or byte) shuffle of the halves, then zstd/lz4
        cname = "lz4" if codec == "blosc-lz4" else "zstd"
        shuffle = BloscShuffle.bitshuffle if codec == "blosc" else BloscShuffle.shuffle
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=typesize)]
    raise StoreError(f"unknown codec {codec!r}; available: {', '.join(CODECS)}")


def _zarr_store(url: str, storage_options: dict[str, Any] | None, read_only: bool):
    if "://" not in url or url.startswith("file://"):
        return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)
    opts = storage_options_for(url, storage_options)
    if url.split("://", 1)[0] in ("s3", "s3a"):
        opts.pop("use_listings_cache", None)
    return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


def _fingerprint_diff(a: dict, b: dict) -> str:
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class FeatureStore:
    """One ``[h, w, D]`` map per image id, read as float16 (float32 from a float32 store); see the
    module docstring for the layout."""

    def __init__(self, url: str, store, attrs: dict, codec: str, level: int):
        self.url = url
        self._store = store
        self._attrs = attrs
        self.codec, self.level = codec, level
        self.dtype = attrs.get("map_dtype", "float16")
        self._compressors = _compressors(codec, level, 4 if self.dtype == "float32" else 2)

    def __repr__(self) -> str:
        return f"FeatureStore({redact(self.url)!r}, codec={self.codec!r}, level={self.level}, dtype={self.dtype!r})"

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, url: str, fingerprint: dict, storage_options: dict | None = None, codec: str = "none",
               level: int = 3, dtype: str = "float16") -> "FeatureStore":
        """Create the store (root group written here and only here); an existing store with the
        same fingerprint is just opened, one with another fingerprint is refused."""
        _compressors(codec, level)  # an unknown codec or dtype fails before anything is written
        if dtype not in MAP_DTYPES:
            raise StoreError(f"unknown map dtype {dtype!r}; available: {', '.join(MAP_DTYPES)}")
        try:
            return cls.open(url, storage_options, fingerprint=fingerprint)
        except StoreNotFound:
            pass
        store = _zarr_store(url, storage_options, read_only=False)
        attrs = {"fingerprint": fingerprint, "layout_version": LAYOUT_VERSION, "codec": codec, "codec_level": level,
                 "map_dtype": dtype}
        try:
            root = zarr.open_group(store=store, mode="w-", zarr_format=3, attributes=attrs)
        except (ContainsGroupError, ContainsArrayError, ContainsArrayAndGroupError, FileExistsError):  # another process won the race
            return cls.open(url, storage_options, fingerprint=fingerprint)
        root.require_group("maps")
        return cls(url, store, attrs, codec, level)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, fingerprint: dict | None = None) -> "FeatureStore":
        """Open an existing store; with ``fingerprint`` given, a store of another teacher is refused."""
        try:
            root = zarr.open_group(store=_zarr_store(url, storage_options, read_only=True), mode="r", zarr_format=3)
        except (FileNotFoundError, NodeNotFoundError):
            raise StoreNotFound(f"no feature store at {redact(url)} (create it with the extract stage)") from None
        attrs = dict(root.attrs)
        if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
            raise StoreError(
                f"{redact(url)} holds maps of another teacher (differs in: "
                f"{_fingerprint_diff(attrs.get('fingerprint') or {}, fingerprint)}); use a new run folder"
            )
        store = _zarr_store(url, storage_options, read_only=False)
        return cls(url, store, attrs, attrs.get("codec", "blosc"), int(attrs.get("codec_level", 3)))

    @property
    def fingerprint(self) -> dict:
        return dict(self._attrs.get("fingerprint") or {})

    # -- maps ----------------------------------------------------------------------------

    @staticmethod
    def _path(image_id: int) -> str:
        return f"maps/{int(image_id)}"

    def _chunk_key(self, image_id: int) -> str:
        """The one chunk's key: float maps are [h, w, D], packed int8 ones [4 + h·w, D]."""
        return f"{self._path(image_id)}/c/{'0/0' if self.dtype == 'int8' else '0/0/0'}"

    def _new_array(self, image_id: int, data: np.ndarray, attrs: dict, overwrite: bool) -> zarr.Array:
        # float maps fill with NaN and int8 with 0 (never a stored scale): an absent chunk is never a map
        fill = float("nan") if data.dtype.kind == "f" else 0
        return zarr.create_array(
            store=self._store, name=self._path(image_id), shape=data.shape, chunks=data.shape, dtype=data.dtype,
            compressors=self._compressors, fill_value=fill, attributes=attrs, overwrite=overwrite,
            config={"write_empty_chunks": True},
        )

    def write(self, image_id: int, arr: np.ndarray, attrs: dict | None = None) -> str:
        """Write one whole map and return its checksum (of the map ``read`` will return: float32 in a
        float32 store, else float16). A redo is harmless: the existing array is reused and its single
        chunk replaced in one put."""
        arr = np.ascontiguousarray(arr, dtype=np.float32 if self.dtype == "float32" else np.float16)
        if arr.ndim != 3:
            raise StoreError(f"image {image_id}: map must be [h, w, D], got shape {arr.shape}")
        meta = {"image_id": int(image_id), **(attrs or {})}
        if "digest" in self.fingerprint:
            meta.setdefault("fingerprint", self.fingerprint["digest"])
        data = arr
        if self.dtype == "int8":
            if not np.isfinite(arr).all():
                raise StoreError(f"image {image_id}: map holds NaN or Inf; cannot be stored as int8")
            data, arr = _pack_int8(arr)
            meta["map_shape"] = list(arr.shape)
        checksum = _checksum_async(arr)
        try:
            a = self._new_array(image_id, data, meta, overwrite=False)
        except ContainsArrayError:  # a redo: keep the array so readers never see it vanish
            a = zarr.open_array(store=self._store, path=self._path(image_id), mode="r+", zarr_format=3)
            if tuple(a.shape) != data.shape or a.dtype != data.dtype or tuple(a.chunks) != data.shape:
                a = self._new_array(image_id, data, meta, overwrite=True)  # another shape: replace
            elif dict(a.attrs) != meta:
                a.attrs.update(meta)
        a[...] = data
        return checksum.result()

    def _array(self, image_id: int) -> zarr.Array:
        try:
            return zarr.open_array(store=self._store, path=self._path(image_id), mode="r", zarr_format=3)
        except (FileNotFoundError, NodeNotFoundError):
            raise MapMissing(f"image {image_id}: no map in {redact(self.url)}") from None

    def _has_chunk(self, image_id: int) -> bool:
        return bool(sync(self._store.exists(self._chunk_key(image_id))))

    def _get(self, key: str) -> np.ndarray | None:
        """One object's bytes as a writable uint8 array, None when absent."""
        if isinstance(self._store, zarr.storage.LocalStore):  # no event-loop round trip, no extra copy
            try:
                return np.fromfile(self._store.root / key, dtype=np.uint8)
            except FileNotFoundError:
                return None
        buf = sync(self._store.get(key, default_buffer_prototype()))
        if buf is None:
            return None
        data = buf.as_numpy_array().view(np.uint8)
        return data if data.flags.writeable else data.copy()  # bytes from fsspec are read-only

    def _missing(self, image_id: int) -> MapMissing:
        return MapMissing(f"image {image_id}: map in {redact(self.url)} has no data (write cut short)",
                          "missing chunk")

    def _stored(self, image_id: int) -> tuple[np.ndarray, dict]:
        """(the stored array as it is: a float16/float32 map or packed int8, its attributes); a
        missing chunk raises MapMissing."""
        raw = self._get(f"{self._path(image_id)}/zarr.json")
        if raw is None:
            raise MapMissing(f"image {image_id}: no map in {redact(self.url)}")
        try:
            meta = json.loads(raw.tobytes())
            shape, dtype = tuple(meta["shape"]), np.dtype(meta["data_type"])
            codecs = meta.get("codecs") or [{}]
            plain = (len(codecs) == 1 and codecs[0].get("name") == "bytes"  # one-byte types carry no endian
                     and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
                     and meta["chunk_grid"]["configuration"]["chunk_shape"] == list(shape))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"image {image_id}: damaged metadata in {redact(self.url)} ({first_line(e, typed=True)})") from None
        if plain and dtype.name in MAP_DTYPES:  # the chunk's bytes are the array
            data = self._get(self._chunk_key(image_id))
            if data is None:
                raise self._missing(image_id)
            if data.size != math.prod(shape) * dtype.itemsize:
                raise StoreError(f"image {image_id}: chunk holds {data.size} bytes, the map needs "
                                 f"{math.prod(shape) * dtype.itemsize}: damaged")
            return data.view(dtype.newbyteorder("<")).reshape(shape), meta.get("attributes") or {}
        a = self._array(image_id)
        out = a[...]
        if out.size and _is_fill(out.flat[0], a.fill_value) and not self._has_chunk(image_id):
            raise self._missing(image_id)
        return out, dict(a.attrs)

    def read(self, image_id: int) -> np.ndarray:
        """The map ``[h, w, D]``: float32 from a float32 store, float16 from a float16 or int8 one;
        MapMissing (a StoreError and a KeyError) if absent."""
        out, attrs = self._stored(image_id)
        if out.dtype != np.int8:
            return np.asarray(out, dtype=np.float32 if out.dtype == np.float32 else np.float16)
        shape = tuple(attrs.get("map_shape") or ())
        if out.ndim != 2 or len(shape) != 3 or out.shape != (_SCALE_ROWS + math.prod(shape[:2]), shape[-1]):
            raise StoreError(f"image {image_id}: int8 map of {out.shape} does not hold map_shape {list(shape)}: damaged")
        return _unpack_int8(out, shape)

    def ids(self) -> list[int]:
        """Image ids with a map array (a listing: its chunk may still be missing), ascending."""
        group = zarr.open_group(store=self._store, path="maps", mode="r", zarr_format=3)
        return sorted(int(k) for k in group.array_keys() if k.isdigit())

    def exists(self, image_id: int) -> bool:
        """True when both the array and its chunk are stored."""
        try:
            self._array(image_id)
        except MapMissing:
            return False
        return self._has_chunk(image_id)

    def verify(self, image_id: int, shape: tuple[int, ...], checksum: str) -> str | None:
        """Re-read one map: None when whole, else a one-line reason."""
        try:
            data = self.read(image_id)
        except MapMissing as e:
            return e.reason
        except Exception as e:  # damaged metadata, or a damaged chunk failing inside the codec pipeline
            return f"unreadable: {first_line(e, typed=True)}"
        if data.shape != tuple(shape):
            return f"shape {data.shape} != {tuple(shape)}"
        if map_checksum(data) != checksum:
            return "checksum mismatch"
        return None

    def delete(self, image_id: int) -> None:
        """Remove one map (chunk first, so a cut delete leaves a missing map, never a wrong one)."""
        sync(self._store.delete(self._chunk_key(image_id)))
        sync(self._store.delete_dir(self._path(image_id)))

    def nbytes_stored(self, image_id: int) -> int:
        """Bytes on storage for one map (metadata and chunk)."""
        return int(self._array(image_id).nbytes_stored())
