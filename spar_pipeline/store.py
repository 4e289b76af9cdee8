"""The teacher feature store: one float16 map per image in Zarr v3, on any fsspec URL.

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
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.core.sync import sync
from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError, NodeNotFoundError

from spar_pipeline.fsutil import _s3_options, redact

__all__ = ["CODECS", "FeatureStore", "MapMissing", "StoreError", "StoreNotFound", "map_checksum"]

LAYOUT_VERSION = 1
# "blosc": zstd over bit-shuffled float16 (measured best in bench/bench_store.py: ~0.89x raw, about
# twice zstd's read speed); "zstd" alone carries a frame checksum; the rest are measured alternatives.
CODECS = ("blosc", "zstd", "blosc-shuffle", "blosc-lz4", "none")
_CHUNK = (0, 0, 0)


class StoreError(RuntimeError):
    """The store is missing, belongs to another teacher, or a map is missing or damaged."""


class StoreNotFound(StoreError, FileNotFoundError):
    """No feature store at the URL."""


class MapMissing(StoreError, KeyError):
    """No (complete) map for this image id."""

    __str__ = BaseException.__str__  # KeyError would quote the message


def map_checksum(arr: np.ndarray) -> str:
    """sha256 of the C-contiguous float16 bytes, first 32 hex chars: what the manifest records."""
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float16)).hexdigest()[:32]


_hasher: ThreadPoolExecutor | None = None


def _checksum_async(arr: np.ndarray) -> Future:
    """hashlib drops the GIL on large buffers: hash in a thread while zarr encodes and writes."""
    global _hasher
    if _hasher is None:
        _hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-checksum")
    return _hasher.submit(map_checksum, arr)


def _safe_url(url: str) -> str:
    """The URL as users may see it: no user:password@, no signed query secrets."""
    return redact(re.sub(r"(://)[^/@]*@", r"\1***@", url))


def _compressors(codec: str, level: int) -> list:
    if codec == "none":
        return []
    if codec == "zstd":  # the frame checksum makes a damaged chunk fail to decode
        return [ZstdCodec(level=level, checksum=True)]
    if codec in ("blosc", "blosc-shuffle", "blosc-lz4"):  # bit (or byte) shuffle of the halves, then zstd/lz4
        cname = "lz4" if codec == "blosc-lz4" else "zstd"
        shuffle = BloscShuffle.bitshuffle if codec == "blosc" else BloscShuffle.shuffle
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=2)]
    raise StoreError(f"unknown codec {codec!r}; available: {', '.join(CODECS)}")


def _zarr_store(url: str, storage_options: dict[str, Any] | None, read_only: bool):
    if "://" not in url or url.startswith("file://"):
        return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)
    opts = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        opts = _s3_options(opts)
        opts.pop("use_listings_cache", None)
    return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


def _fingerprint_diff(a: dict, b: dict) -> str:
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


class FeatureStore:
    """One float16 ``[h, w, D]`` map per image id; see the module docstring for the layout."""

    def __init__(self, url: str, store, attrs: dict, codec: str, level: int):
        self.url = url
        self._store = store
        self._attrs = attrs
        self.codec, self.level = codec, level
        self._compressors = _compressors(codec, level)

    def __repr__(self) -> str:
        return f"FeatureStore({_safe_url(self.url)!r}, codec={self.codec!r}, level={self.level})"

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, url: str, fingerprint: dict, storage_options: dict | None = None, codec: str = "blosc",
               level: int = 3) -> "FeatureStore":
        """Create the store (root group written here and only here); an existing store with the
        same fingerprint is just opened, one with another fingerprint is refused."""
        _compressors(codec, level)  # an unknown codec fails before anything is written
        try:
            return cls.open(url, storage_options, fingerprint=fingerprint)
        except StoreNotFound:
            pass
        store = _zarr_store(url, storage_options, read_only=False)
        attrs = {"fingerprint": fingerprint, "layout_version": LAYOUT_VERSION, "codec": codec, "codec_level": level}
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
            raise StoreNotFound(f"no feature store at {_safe_url(url)} (create it with the extract stage)") from None
        attrs = dict(root.attrs)
        if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
            raise StoreError(
                f"{_safe_url(url)} holds maps of another teacher (differs in: "
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
        return f"{self._path(image_id)}/c/{'/'.join(map(str, _CHUNK))}"

    def _new_array(self, image_id: int, shape: tuple[int, ...], attrs: dict, overwrite: bool) -> zarr.Array:
        return zarr.create_array(
            store=self._store, name=self._path(image_id), shape=shape, chunks=shape, dtype="float16",
            compressors=self._compressors, fill_value=float("nan"), attributes=attrs, overwrite=overwrite,
            config={"write_empty_chunks": True},
        )

    def write(self, image_id: int, arr: np.ndarray, attrs: dict | None = None) -> str:
        """Write one whole map and return its checksum. A redo is harmless: the existing array is
        reused and its single chunk replaced in one put."""
        arr = np.ascontiguousarray(arr, dtype=np.float16)
        if arr.ndim != 3:
            raise StoreError(f"image {image_id}: map must be [h, w, D], got shape {arr.shape}")
        checksum = _checksum_async(arr)
        meta = {"image_id": int(image_id), **(attrs or {})}
        if "digest" in self.fingerprint:
            meta.setdefault("fingerprint", self.fingerprint["digest"])
        try:
            a = self._new_array(image_id, arr.shape, meta, overwrite=False)
        except ContainsArrayError:  # a redo: keep the array so readers never see it vanish
            a = zarr.open_array(store=self._store, path=self._path(image_id), mode="r+", zarr_format=3)
            if tuple(a.shape) != arr.shape or a.dtype != np.float16 or tuple(a.chunks) != arr.shape:
                a = self._new_array(image_id, arr.shape, meta, overwrite=True)  # another shape: replace
            elif dict(a.attrs) != meta:
                a.attrs.update(meta)
        a[...] = arr
        return checksum.result()

    def _array(self, image_id: int) -> zarr.Array:
        try:
            return zarr.open_array(store=self._store, path=self._path(image_id), mode="r", zarr_format=3)
        except (FileNotFoundError, NodeNotFoundError):
            raise MapMissing(f"image {image_id}: no map in {_safe_url(self.url)}") from None

    def _has_chunk(self, image_id: int) -> bool:
        return bool(sync(self._store.exists(self._chunk_key(image_id))))

    def read(self, image_id: int) -> np.ndarray:
        """The map as float16 ``[h, w, D]``; MapMissing (a StoreError and a KeyError) if absent."""
        out = np.asarray(self._array(image_id)[...], dtype=np.float16)
        if out.size and np.isnan(out.flat[0]) and not self._has_chunk(image_id):
            raise MapMissing(f"image {image_id}: map in {_safe_url(self.url)} has no data (write cut short)")
        return out

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
            a = self._array(image_id)
        except MapMissing:
            return "missing"
        except Exception as e:  # damaged metadata
            return f"unreadable: {_one_line(e)}"
        if tuple(a.shape) != tuple(shape):
            return f"shape {tuple(a.shape)} != {tuple(shape)}"
        try:
            data = np.asarray(a[...], dtype=np.float16)
        except Exception as e:  # a damaged chunk fails inside the codec pipeline
            return f"unreadable: {_one_line(e)}"
        if map_checksum(data) != checksum:
            if data.size and np.isnan(data.flat[0]) and not self._has_chunk(image_id):
                return "missing chunk"
            return "checksum mismatch"
        return None

    def delete(self, image_id: int) -> None:
        """Remove one map (chunk first, so a cut delete leaves a missing map, never a wrong one)."""
        sync(self._store.delete(self._chunk_key(image_id)))
        sync(self._store.delete_dir(self._path(image_id)))

    def nbytes_stored(self, image_id: int) -> int:
        """Bytes on storage for one map (metadata and chunk)."""
        return int(self._array(image_id).nbytes_stored())
