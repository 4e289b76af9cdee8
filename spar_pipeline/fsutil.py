"""One place that turns a URL into an fsspec filesystem, honouring the standard AWS environment."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["filesystem", "storage_options_for", "is_local", "redact", "write_local_atomic"]


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(opts.get("client_kwargs") or {})
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
        client_kwargs["endpoint_url"] = endpoint
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    # Manifests are re-listed to see other machines' parts: never trust a cached listing.
    opts.setdefault("use_listings_cache", False)
    opts.setdefault("skip_instance_cache", False)
    # Retries with backoff on 5xx/throttling are botocore's job; give it room.
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"max_attempts": 8, "mode": "adaptive"})
    opts["config_kwargs"] = config_kwargs
    return opts


def storage_options_for(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec storage options to open ``url`` with: the given ones, plus for ``s3://`` the
    endpoint from AWS_ENDPOINT_URL(_S3), uncached listings and botocore's adaptive retries.
    Components that open their own filesystem from a URL (the zarr store) use this too."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return _s3_options(options) if protocol in ("s3", "s3a") else options


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


_SECRET = re.compile(r"(?i)(secret|token|password|credential|signature|policy|key-pair-id|x-amz-[a-z-]+)=([^&\s'\"]+)")
_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")


def redact(text: str) -> str:
    """Strip query-string secrets (signed URLs in the SA-1B links file) and ``user:password@``
    from text shown to users."""
    return _USERINFO.sub("***@", _SECRET.sub(lambda m: f"{m.group(1)}=***", text))


def write_local_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Whole-or-nothing local write: temporary file, fsync, rename; a failed write leaves no temporary."""
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
