"""The teacher feature store: one float16 map per image in Zarr v3, on any fsspec URL.

Layout: ``features.zarr/`` root group (attributes: fingerprint, layout version, written once
by ``create``), ``maps/<image_id>`` one array per image with a single whole-map chunk. One
array per image means one writer per chunk at all times and no worker ever touches the
root metadata, so concurrent workers and machines cannot lose each other's updates.
Callers never touch zarr directly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from spar_pipeline.fsutil import _s3_options, redact

__all__ = ["FeatureStore", "StoreError", "map_checksum"]

LAYOUT_VERSION = 1


class StoreError(RuntimeError):
    """The store is missing, belongs to another teacher, or a map is damaged."""


def map_checksum(arr: np.ndarray) -> str:
    """sha256 of the C-contiguous float16 bytes: what the manifest records and verify checks."""
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float16).tobytes()).hexdigest()[:32]


def _codec(name: str, level: int) -> list:
    if name == "none":
        return []
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=level, shuffle=BloscShuffle.shuffle, typesize=2)]
    return [ZstdCodec(level=level)]


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


class FeatureStore:
    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None, codec: str, level: int):
        self.url = url
        self._group = group
        self._storage_options = storage_options
        self._compressors = _codec(codec, level)

    @classmethod
    def create(cls, url: str, fingerprint: dict, storage_options: dict | None = None, codec: str = "zstd",
               level: int = 3) -> "FeatureStore":
        """Create the store once; an existing store with the same fingerprint is just opened."""
        try:
            return cls.open(url, storage_options, fingerprint=fingerprint, codec=codec, level=level)
        except FileNotFoundError:
            pass
        store = _zarr_store(url, storage_options, read_only=False)
        root = zarr.open_group(store=store, mode="w-", zarr_format=3,
                               attributes={"fingerprint": fingerprint, "layout_version": LAYOUT_VERSION,
                                           "codec": codec, "codec_level": level})
        root.require_group("maps")
        return cls(url, root, storage_options, codec, level)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, fingerprint: dict | None = None,
             codec: str | None = None, level: int | None = None) -> "FeatureStore":
        store = _zarr_store(url, storage_options, read_only=False)
        try:
            root = zarr.open_group(store=store, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError if hasattr(zarr.errors, "GroupNotFoundError") else FileNotFoundError):
            raise FileNotFoundError(f"no feature store at {redact(url)}") from None
        attrs = dict(root.attrs)
        if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
            raise StoreError(
                f"{redact(url)} holds maps of another teacher (differs in: "
                f"{_fingerprint_diff(attrs.get('fingerprint') or {}, fingerprint)}); use a new run folder"
            )
        root = zarr.open_group(store=store, mode="r+", zarr_format=3)
        return cls(url, root, storage_options, codec or attrs.get("codec", "zstd"),
                   level if level is not None else attrs.get("codec_level", 3))

    @property
    def fingerprint(self) -> dict:
        return dict(self._group.attrs.get("fingerprint") or {})

    def _path(self, image_id: int) -> str:
        return f"maps/{int(image_id)}"

    def write(self, image_id: int, arr: np.ndarray, attrs: dict | None = None) -> str:
        """Write one whole map (idempotent: a rewrite replaces it) and return its checksum."""
        arr = np.ascontiguousarray(arr, dtype=np.float16)
        if arr.ndim != 3:
            raise StoreError(f"image {image_id}: map must be [h, w, D], got shape {arr.shape}")
        a = zarr.create_array(
            store=self._group.store_path.store,
            name=self._path(image_id),
            shape=arr.shape,
            chunks=arr.shape,
            dtype="float16",
            compressors=self._compressors,
            fill_value=0,
            overwrite=True,
            attributes={"image_id": int(image_id), "fingerprint": self.fingerprint.get("digest", ""), **(attrs or {})},
        )
        a[...] = arr
        return map_checksum(arr)

    def _array(self, image_id: int) -> zarr.Array:
        try:
            return zarr.open_array(store=self._group.store_path.store, path=self._path(image_id), mode="r")
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.ArrayNotFoundError if hasattr(zarr.errors, "ArrayNotFoundError") else KeyError):
            raise KeyError(f"image {image_id}: no map in {redact(self.url)}") from None

    def read(self, image_id: int) -> np.ndarray:
        return np.asarray(self._array(image_id)[...], dtype=np.float16)

    def exists(self, image_id: int) -> bool:
        try:
            self._array(image_id)
            return True
        except KeyError:
            return False

    def verify(self, image_id: int, shape: tuple[int, ...], checksum: str) -> str | None:
        """None when the map is whole, else a one-line reason."""
        try:
            a = self._array(image_id)
        except KeyError:
            return "missing"
        if tuple(a.shape) != tuple(shape):
            return f"shape {tuple(a.shape)} != {tuple(shape)}"
        try:
            data = np.asarray(a[...], dtype=np.float16)
        except Exception as e:  # a damaged chunk fails inside the codec pipeline
            return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        if map_checksum(data) != checksum:
            return "checksum mismatch"
        return None

    def delete(self, image_id: int) -> None:
        import asyncio  # noqa: F401  (zarr's sync API drives its own loop)

        from zarr.core.sync import sync

        sync(self._group.store_path.store.delete_dir(self._path(image_id)))

    def nbytes_stored(self, image_id: int) -> int:
        return int(self._array(image_id).nbytes_stored())
