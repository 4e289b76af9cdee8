"""Where the files that ship with the package live (recipes, schemas, class names)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    # A wheel carries the folder under _data/; an editable checkout keeps it at the top level.
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"spar-pipeline data folder {name!r} not found beside {_PKG}")


def stages_dir() -> Path:
    return _find("stages")


def manifests_dir() -> Path:
    return _find("manifests")


def assets_dir() -> Path:
    """Class-name lists and prompt templates (copied from the reference, shipped in the package)."""
    return _PKG / "assets"
