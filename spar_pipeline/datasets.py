"""The six evaluation benchmarks in their mmseg layouts: one string-keyed registry.

Each entry is data (docs/reference.md, "Evaluation"): where the images and annotations
lie under the dataset root, the split file (or none: the image folder is scanned
recursively, as mmseg does), the file suffixes, whether the zero label is reduced (0 → 255,
others − 1), the class-name file shipped in ``spar_pipeline/assets/classnames`` and which
recipe resize scale applies. ``get_dataset(name, root)`` yields ``(image, label, name)``:
image uint8 RGB [H, W, 3] at its original size, label int64 [H, W] with 255 = ignore.

``root`` may be the dataset folder itself (``…/VOCdevkit/VOC2012``) or a folder above it
that holds the mmseg ``data_root`` (``…`` containing ``VOCdevkit/VOC2012``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from spar_pipeline.errors import DatasetError
from spar_pipeline.resources import assets_dir

__all__ = ["DatasetSpec", "Benchmark", "DatasetError", "list_datasets", "get_spec", "get_dataset", "class_lines",
           "templates", "load_label", "load_image", "resize_scale", "make_synthetic"]

IGNORE = 255


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    data_root: str  # the mmseg data_root, relative to a parent folder the user may pass instead
    img_dir: str
    ann_dir: str
    ann_file: str | None  # split file of stems; None: scan img_dir recursively
    img_suffix: str
    seg_suffix: str
    reduce_zero_label: bool
    class_file: str  # in assets/classnames
    resize: str  # the EvaluateConfig field holding the keep-ratio scale: "resize" or "cityscapes_resize"


def _spec(name, data_root, img_dir, ann_dir, ann_file, img_suffix, seg_suffix, reduce_zero_label, class_file,
          resize="resize") -> DatasetSpec:
    return DatasetSpec(name, data_root, img_dir, ann_dir, ann_file, img_suffix, seg_suffix, reduce_zero_label,
                       class_file, resize)


_VOC_SPLIT = "ImageSets/Segmentation/val.txt"
_CTX_SPLIT = "ImageSets/SegmentationContext/val.txt"
_SPECS: dict[str, DatasetSpec] = {}
for _s in (
    _spec("voc21", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", _VOC_SPLIT, ".jpg", ".png", False,
          "voc21.txt"),
    _spec("voc20", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", _VOC_SPLIT, ".jpg", ".png", True,
          "voc20.txt"),
    _spec("context60", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", _CTX_SPLIT, ".jpg", ".png",
          False, "context60.txt"),
    _spec("context59", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", _CTX_SPLIT, ".jpg", ".png",
          True, "context59.txt"),
    _spec("ade20k", "ADEChallengeData2016", "images/validation", "annotations/validation", None, ".jpg", ".png",
          True, "ade20k.txt"),
    _spec("cityscapes", "cityscapes", "leftImg8bit/val", "gtFine/val", None, "_leftImg8bit.png",
          "_gtFine_labelTrainIds.png", False, "city_scapes.txt", resize="cityscapes_resize"),
    # The miniature world's benchmark (spar_pipeline.mini.scenes.make_scene_benchmark): ids 0…20 as stored.
    _spec("scenes", "scenes", "images/val", "annotations/val", None, ".png", ".png", False, "scenes.txt"),
):
    if _s.name in _SPECS:  # pragma: no cover - a registry bug
        raise ValueError(f"dataset {_s.name!r} registered twice")
    _SPECS[_s.name] = _s


_SYNTHETIC = ("scenes",)  # registered, but not one of the paper's six (Table 1, Mean6)


def list_datasets(include_synthetic: bool = False) -> list[str]:
    """The paper's six benchmarks in Table 1 order; ``include_synthetic`` adds ``scenes``."""
    return [n for n in _SPECS if include_synthetic or n not in _SYNTHETIC]


def get_spec(name: str) -> DatasetSpec:
    if name not in _SPECS:
        raise DatasetError(f"unknown dataset {name!r}; choose from: {', '.join(list_datasets(True))}")
    return _SPECS[name]


def class_lines(name_or_file: str) -> list[str]:
    """Class lines of a benchmark (or of a ``.txt`` in assets/classnames): one class a line,
    synonyms separated by ", ", trailing spaces kept (the reference reads them so)."""
    file = name_or_file if name_or_file.endswith(".txt") else get_spec(name_or_file).class_file
    text = (assets_dir() / "classnames" / file).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates, in order (``{}`` is the class name)."""
    return (assets_dir() / "templates_openai_imagenet.txt").read_text(encoding="utf-8").splitlines()


def resize_scale(name: str, cfg) -> tuple[int, int]:
    """The keep-ratio resize scale of benchmark ``name`` from an ``EvaluateConfig``."""
    return tuple(getattr(cfg, get_spec(name).resize))


def load_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB [H, W, 3], decoded by cv2 as mmcv's LoadImageFromFile does (then BGR → RGB); the EXIF
    orientation through ``imageio.orient``, the one transform the ingest/augment decode applies too."""
    import cv2

    from spar_pipeline.imageio import orient, orientation

    if os.path.exists(path) and not os.path.isfile(path):  # a pipe or device: the read could wait forever
        raise DatasetError(f"{path}: not a regular file")
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if bgr is None:
        raise DatasetError(f"{path}: not a readable image")
    return np.ascontiguousarray(orient(bgr[..., ::-1], orientation(data.tobytes())))


def load_label(path: str | os.PathLike, reduce_zero_label: bool) -> np.ndarray:
    """int64 [H, W] class ids as stored (palette indices for VOC), 255 = ignore; with
    ``reduce_zero_label`` 0 → 255 and every other id − 1 (mmseg's rule)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{path}: annotation mode {im.mode}; expected a single-channel (palette or L) PNG")
        label = np.array(im).astype(np.int64)
    if reduce_zero_label:
        label[label == 0] = IGNORE
        label -= 1
        label[label == IGNORE - 1] = IGNORE  # both the old 0 and the old 255 end up ignored
    return label


class Benchmark:
    """One benchmark on disk: ``len()``, indexing and iteration yield (image, label, name)."""

    def __init__(self, spec: DatasetSpec, root: str | os.PathLike):
        self.spec = spec
        self.root = _resolve_root(spec, Path(root))
        self.items = _list_items(spec, self.root)
        self.class_lines = class_lines(spec.class_file)
        self.num_classes = len(self.class_lines)

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        name, img, ann = self.items[i]
        image, label = load_image(img), load_label(ann, self.spec.reduce_zero_label)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{ann}: annotation {label.shape[1]}×{label.shape[0]} does not match image "
                               f"{image.shape[1]}×{image.shape[0]} ({img})")
        return image, label, name

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"Benchmark({self.name!r}, {str(self.root)!r}, {len(self)} images)"


def get_dataset(name: str, root: str | os.PathLike) -> Benchmark:
    """Benchmark ``name`` (one of ``list_datasets()``) found under ``root`` in its mmseg layout."""
    return Benchmark(get_spec(name), root)


def _resolve_root(spec: DatasetSpec, root: Path) -> Path:
    for candidate in (root, root / spec.data_root):
        if (candidate / spec.img_dir).is_dir():
            return candidate
    raise DatasetError(
        f"{spec.name}: no image folder at {root / spec.img_dir} (nor {root / spec.data_root / spec.img_dir}); "
        f"pass the mmseg data_root ({spec.data_root}/ holding {spec.img_dir}/ and {spec.ann_dir}/)"
    )


def _list_items(spec: DatasetSpec, root: Path) -> list[tuple[str, Path, Path]]:
    img_dir, ann_dir = root / spec.img_dir, root / spec.ann_dir
    if not ann_dir.is_dir():
        raise DatasetError(f"{spec.name}: no annotation folder at {ann_dir}")
    if spec.ann_file is not None:
        split = root / spec.ann_file
        if not split.is_file():
            raise DatasetError(f"{spec.name}: no split file at {split}")
        stems = [s.strip() for s in split.read_text().splitlines() if s.strip()]
    else:  # mmseg scans img_dir recursively for the suffix, sorted
        stems = sorted(
            str(p.relative_to(img_dir))[: -len(spec.img_suffix)]
            for p in img_dir.rglob(f"*{spec.img_suffix}") if p.is_file()
        )
    if not stems:
        raise DatasetError(f"{spec.name}: no images (*{spec.img_suffix}) listed under {root}")
    items = []
    for stem in stems:
        img, ann = img_dir / f"{stem}{spec.img_suffix}", ann_dir / f"{stem}{spec.seg_suffix}"
        if not img.is_file():
            raise DatasetError(f"{spec.name}: image {img} is listed but missing")
        if not ann.is_file():
            raise DatasetError(f"{spec.name}: annotation {ann} for image {img} is missing")
        items.append((stem, img, ann))
    return items


def make_synthetic(name: str, root: str | os.PathLike, n: int = 3, size: tuple[int, int] = (48, 64),
                   seed: int = 0) -> Path:
    """Write ``n`` random images with block labels in benchmark ``name``'s exact mmseg layout under
    ``root/<data_root>`` (tests and demos; no real data needed). Returns ``root``.

    Stored labels follow the benchmark's convention: raw ids 0..C−1 (or 0..C with 0 = "other" for
    reduce-zero-label sets), 255 on a one-pixel border (ignore); VOC labels are palette PNGs,
    Cityscapes files sit in city sub-folders with its suffixes.
    """
    from PIL import Image

    spec = get_spec(name)
    base = Path(root) / spec.data_root
    num = len(class_lines(spec.class_file)) + (1 if spec.reduce_zero_label else 0)
    rng = np.random.default_rng(seed)
    H, W = size
    stems = []
    for i in range(n):
        stem = f"{['frankfurt', 'lindau', 'munster'][i % 3]}/{['frankfurt', 'lindau', 'munster'][i % 3]}_" \
               f"{i:06d}_000019" if name == "cityscapes" else f"2008_{i:06d}"
        stems.append(stem)
        label = np.zeros((H, W), np.uint8)
        for _ in range(4):  # a few rectangles of random classes
            y, x = rng.integers(0, H - 4), rng.integers(0, W - 4)
            label[y:y + rng.integers(4, H), x:x + rng.integers(4, W)] = rng.integers(0, num)
        label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = IGNORE
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        img_path = base / spec.img_dir / f"{stem}{spec.img_suffix}"
        ann_path = base / spec.ann_dir / f"{stem}{spec.seg_suffix}"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(img_path, quality=95) if spec.img_suffix.endswith(".jpg") else \
            Image.fromarray(image).save(img_path)
        ann = Image.fromarray(label)
        if name.startswith("voc"):
            ann = ann.convert("P")
            ann.putpalette([c for k in range(256) for c in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)])
        ann.save(ann_path)
    if spec.ann_file is not None:
        split = base / spec.ann_file
        split.parent.mkdir(parents=True, exist_ok=True)
        existing = split.read_text().split() if split.exists() else []
        split.write_text("\n".join(dict.fromkeys(existing + stems)) + "\n")
    return Path(root)
