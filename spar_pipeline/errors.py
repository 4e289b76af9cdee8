"""Every error the pipeline raises on purpose, under one root.

``SparError`` is what the command line catches: its message is one line naming what was wrong,
where, and what to do. Each subclass also inherits the builtin it stands for (a missing source is
a ``FileNotFoundError``, a bad recipe value a ``ValueError``), so library callers can keep
catching the builtin. Anything else reaching the command line is a bug, shown as such.

The stage modules import these from here and keep the names importable where they always were
(``spar_pipeline.recipe.RecipeError`` is this ``RecipeError``).
"""

from __future__ import annotations

__all__ = [
    "SparError", "OptionError", "EndpointError", "RecipeError", "RunError", "ManifestError", "SourceError",
    "ImageRejected", "StoreError", "StoreNotFound", "MapMissing", "BackboneError", "CheckpointError",
    "TrainError", "EvaluateError", "DatasetError", "first_line",
]


class SparError(Exception):
    """The root: a failure the user can act on, told in one line."""


# ---- what the user asked for ---------------------------------------------------------------------
class OptionError(SparError, ValueError):
    """An option or argument value that cannot be used; the message names the option, the value and what is allowed."""


class EndpointError(SparError, ConnectionError):
    """A scheduler or object store that does not answer (after the client's own retries); the message names it."""


class RecipeError(SparError, ValueError):
    """A recipe file is wrong; the message names the file, the key and what is allowed."""


class RunError(SparError, RuntimeError):
    """The run folder cannot be used as asked; the message says why and how to fix it."""


# ---- data on disk ----------------------------------------------------------------------------------
class ManifestError(SparError, RuntimeError):
    """A manifest part breaks its contract (unknown version, wrong columns)."""


class SourceError(SparError, FileNotFoundError):
    """A SOURCE argument names nothing usable."""


class ImageRejected(SparError, ValueError):
    """The bytes are not a usable image; the message is the reason recorded in the manifest."""


class StoreError(SparError, RuntimeError):
    """The store is missing, belongs to another teacher, or a map is missing or damaged."""


class StoreNotFound(StoreError, FileNotFoundError):
    """No feature store at the URL."""


class MapMissing(StoreError, KeyError):
    """No (complete) map for this image id; ``reason`` is what verify reports."""

    __str__ = BaseException.__str__  # KeyError would quote the message

    def __init__(self, message: str, reason: str = "missing"):
        super().__init__(message)
        self.reason = reason


# ---- models and stages -----------------------------------------------------------------------------
class BackboneError(SparError, ValueError):
    """A backbone name, checkpoint or trainable spec that cannot be used; the message says what can."""


class CheckpointError(SparError, RuntimeError):
    """No usable checkpoint where one is expected; the message says which files and what to do."""


class TrainError(SparError, RuntimeError):
    """Training cannot start or continue as asked; the message says why and what to do."""


class EvaluateError(SparError, ValueError):
    """The evaluation cannot run as asked; the message says what to pass instead."""


class DatasetError(SparError, ValueError):
    """A benchmark folder is not where or what it should be; the message names the path."""


def first_line(e: BaseException, limit: int = 160, *, typed: bool = False) -> str:
    """``e`` shortened for a log line or a manifest reason: its first non-empty line, credentials in
    URLs removed, at most ``limit`` characters; the type name when the message is empty (or in front
    of it with ``typed``). A ``KeyError`` reads "no 'key'" rather than a bare quoted key."""
    from spar_pipeline.fsutil import redact  # fsutil may raise these errors one day: import late

    text = f"no {e}" if isinstance(e, KeyError) and e.args and not isinstance(e, MapMissing) else str(e)
    text = next((line.strip() for line in redact(text).splitlines() if line.strip()), "")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if typed else text
