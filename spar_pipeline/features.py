"""Dense features of many images with one model: ``spar-pipeline features SOURCE... --out OUT``.

SOURCE: image files, folders (searched recursively), globs, or list files (``.txt``/``.lst``:
one path a line, relative to the list's folder; ``#`` starts a comment). Each image gets a
*name*: its path relative to the folder all the images share, so names are unique and stable
for the same arguments.

OUT:
- ``*.zarr``: a feature store (``spar_pipeline.store``: one float16 ``[h, w, D]`` array per
  image, the teacher store's own layout), its fingerprint = the model and settings below, so a
  rerun with another model or mode is refused instead of mixing maps;
- ``*.npy`` with one image: that one float32 file;
- anything else: a folder of float32 ``.npy`` files, ``a/b.jpg`` -> ``a__b.npy``.

``OUT/index.json`` (written whole before the first map) maps every name to its store id or
file and records the settings. Resume: a map that exists is skipped. A map is written whole
(the store's put, or a temporary file renamed), so a kill at any moment leaves complete maps
and a rerun does only the rest. An unreadable image costs one line and is tried again next time.

Modes: ``single`` (one pass over the whole image; the backbone's own rule for sizes that are not
a multiple of the patch) or ``sliding`` (the teacher: windows of K at ``stride``, stitched as in
``windows.sliding_features``; the image is first resized to multiples of the patch size).
``scale``: each image is resized by this factor first (keep-ratio, cv2 bilinear; 1: as it is).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from spar_pipeline.errors import DatasetError, OptionError, SourceError, first_line
from spar_pipeline.fsutil import write_local_atomic

__all__ = ["collect_images", "image_names", "dense_map", "image_array", "scaled", "run", "read", "MODES",
           "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

MODES = ("single", "sliding")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LIST_SUFFIXES = (".txt", ".lst")
INDEX = "index.json"


# ---- one image ---------------------------------------------------------------------------------
def image_array(image) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` from a PIL image, a path (decoded as evaluation decodes) or an array."""
    from spar_pipeline.datasets import load_image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise OptionError(f"image: expected uint8 RGB [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr


def scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` resized by ``scale`` (cv2 bilinear, each side rounded, at least 1 pixel)."""
    if scale <= 0:
        raise OptionError(f"--scale {scale}: must be > 0")
    if scale == 1:
        return image
    import cv2

    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def _snap(image: np.ndarray, patch: int) -> np.ndarray:
    """Resized (cv2 bilinear) to the nearest multiples of the patch size, at least one patch."""
    import cv2

    h, w = image.shape[:2]
    nh, nw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
    return image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)


@torch.no_grad()
def dense_map(model, image: np.ndarray, *, mode: str = "single", stride: int | None = None,
              scale: float = 1.0, window_batch: int = 32) -> torch.Tensor:
    """float32 ``[h, w, D]`` on the CPU: ``model``'s dense features of uint8 RGB ``image``."""
    from spar_pipeline.segment import normalise
    from spar_pipeline.windows import sliding_features

    if mode not in MODES:
        raise OptionError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    image = scaled(image, scale)
    if mode == "single":
        return model.dense(normalise(model, image))[0].float().cpu()
    if not stride or stride < 1:
        raise OptionError("--mode sliding needs --stride S ≥ 1, e.g. --stride 24")
    x = normalise(model, _snap(image, model.patch_size))
    return sliding_features(model, x, window=model.window, stride=stride, batch=window_batch).float().cpu()


# ---- many images -------------------------------------------------------------------------------
def collect_images(sources: Sequence[str]) -> list[Path]:
    """Every image the SOURCE arguments name, absolute, in argument order (each folder or glob sorted),
    each once. A source that names nothing is an error naming it."""
    out: dict[Path, None] = {}
    for src in sources:
        found = _expand(src)
        if not found:
            raise SourceError(f"{src}: no images here (a folder, glob, list file or image file; "
                              f"image suffixes {', '.join(IMAGE_SUFFIXES)})")
        out.update(dict.fromkeys(found))
    return list(out)


def _expand(src: str) -> list[Path]:
    p = Path(src).expanduser()
    if p.is_dir():
        return sorted(q.resolve() for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        lines = [ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        return [(p.parent / ln).resolve() for ln in lines if ln]  # listed files are kept even if unreadable
    if p.is_file():
        return [p.resolve()]
    if glob.has_magic(src):
        return sorted(Path(m).resolve() for m in glob.glob(os.path.expanduser(src), recursive=True)
                      if os.path.isfile(m) and Path(m).suffix.lower() in IMAGE_SUFFIXES)
    return []


def image_names(paths: Sequence[Path]) -> list[str]:
    """Each path relative to the folder all of them share ('/'-separated)."""
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(root).as_posix() for p in paths]


def _store_id(name: str) -> int:
    """A stable store id per image name (60 bits of its sha256)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)


def _npy_name(name: str) -> str:
    return name.rsplit(".", 1)[0].replace("/", "__") + ".npy"


def run(model, sources: Sequence[str], out: str, *, mode: str = "single", stride: int | None = None,
        scale: float = 1.0, progress: bool = True, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the maps of every image SOURCE names to ``out``; returns counts and the output path.
    ``warn`` receives the one line per unreadable image (default: a logged warning)."""
    from spar_pipeline.progress import StageProgress

    if mode not in MODES:
        raise OptionError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == "sliding" and (not stride or stride < 1):
        raise OptionError("--mode sliding needs --stride S ≥ 1, e.g. --stride 24")
    scaled(np.zeros((1, 1, 3), np.uint8), scale)  # checks the scale before any work
    paths = collect_images(sources)
    names = image_names(paths)
    settings = {"backbone": model.name, "weights_digest": model.weights_digest, "mode": mode,
                "stride": int(stride or 0) if mode == "sliding" else 0, "scale": float(scale)}
    if out.endswith(".npy"):
        if len(paths) != 1:
            raise OptionError(f"--out {out}: a .npy file holds one image's map; give a folder or a .zarr for "
                              f"{len(paths)} images")
        arr = dense_map(model, image_array(paths[0]), mode=mode, stride=stride, scale=scale).numpy()
        _save_npy(Path(out), arr)
        return {"out": out, "written": 1, "skipped": 0, "unreadable": 0, "images": 1, "shape": list(arr.shape)}
    sink = _ZarrSink(out, settings) if out.rstrip("/").endswith(".zarr") else _NpySink(out, settings)
    sink.write_index(names)
    written = skipped = unreadable = 0
    with StageProgress("features", len(paths), enabled=progress) as bar:
        for path, name in zip(paths, names):
            if sink.done(name):
                skipped += 1
            else:
                try:
                    image = image_array(path)
                except (DatasetError, OSError, ValueError) as e:
                    reason = first_line(e)
                    (warn or log.warning)(f"features: {reason if str(path) in reason else f'{path}: {reason}'} "
                                          "(skipped; tried again next time)")
                    unreadable += 1
                    bar.update(1)
                    continue
                sink.write(name, dense_map(model, image, mode=mode, stride=stride, scale=scale).numpy())
                written += 1
            bar.update(1)
    return {"out": out, "written": written, "skipped": skipped, "unreadable": unreadable, "images": len(paths)}


def read(out: str, name: str) -> np.ndarray:
    """The map of image ``name`` (as ``index.json`` lists it) from a features output."""
    index = json.loads(Path(out, INDEX).read_text())
    if name not in index["maps"]:
        raise SourceError(f"{out}: no image named {name!r} in {INDEX}")
    if index["format"] == "zarr":
        from spar_pipeline.store import FeatureStore

        return FeatureStore.open(out).read(index["maps"][name])
    return np.load(Path(out, index["maps"][name]), allow_pickle=False)


# ---- where the maps go ------------------------------------------------------------------------
class _Sink:
    format = ""

    def __init__(self, out: str, settings: dict):
        """Refuses, before anything is written, an output that holds maps of other settings."""
        self.out, self.settings = out, settings
        path = Path(out, INDEX)
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old and old.get("settings") != settings:
            was = old.get("settings") or {}
            diff = sorted(k for k in set(was) | set(settings) if was.get(k) != settings.get(k))
            raise OptionError(f"{out}: holds features of other settings (differs in: {', '.join(diff)}); "
                              "use another --out")
        self._old_maps = dict(old.get("maps") or {})

    def key(self, name: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def write_index(self, names: Sequence[str]) -> None:
        """The settings and every name -> key, merged with an earlier index of the same settings."""
        maps = {**self._old_maps, **{n: self.key(n) for n in names}}
        write_local_atomic(Path(self.out, INDEX), json.dumps({"format": self.format, "settings": self.settings, "maps": maps},
                                       indent=1, sort_keys=True).encode())


class _NpySink(_Sink):
    format = "npy"

    def __init__(self, out: str, settings: dict):
        super().__init__(out, settings)
        Path(out).mkdir(parents=True, exist_ok=True)

    def key(self, name: str) -> str:
        return _npy_name(name)

    def done(self, name: str) -> bool:
        return Path(self.out, self.key(name)).is_file()

    def write(self, name: str, arr: np.ndarray) -> None:
        _save_npy(Path(self.out, self.key(name)), arr.astype(np.float32))


class _ZarrSink(_Sink):
    format = "zarr"

    def __init__(self, out: str, settings: dict):
        from spar_pipeline.store import FeatureStore

        super().__init__(out, settings)
        self.store = FeatureStore.create(out, {"kind": "spar-features", **settings})

    def key(self, name: str) -> int:
        return _store_id(name)

    def done(self, name: str) -> bool:
        return self.store.exists(self.key(name))

    def write(self, name: str, arr: np.ndarray) -> None:
        self.store.write(self.key(name), arr, attrs={"name": name})


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    write_local_atomic(path, buf.getvalue())
