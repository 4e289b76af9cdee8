"""Image files as a training source: the train splits of the mmseg benchmarks, and file rows.

Folders and globs of images are found by ``sources.resolve_sources``; ``--dataset NAME=PATH``
adds the train split of a benchmark in its mmseg layout (its labels are not used). Each file is
read once here, decoded by the one decode function, and rowed with offset 0 and its size, so
later stages read it in place with ``sources.read_member`` as they read a tar member.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from spar_pipeline.errors import DatasetError, first_line
from spar_pipeline.ingest_rows import check_image, few, row
from spar_pipeline.sources import ImageFile, _fs, show_url

__all__ = ["TRAIN_SPLITS", "parse_dataset", "dataset_images", "file_rows"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSplit:
    data_root: str  # the mmseg data_root, relative to a parent folder the user may pass instead
    img_dir: str
    split_file: str | None  # stems, one a line; None: img_dir scanned recursively (as mmseg does)
    suffix: str


TRAIN_SPLITS: dict[str, TrainSplit] = {
    "ade20k": TrainSplit("ADEChallengeData2016", "images/training", None, ".jpg"),
    "cityscapes": TrainSplit("cityscapes", "leftImg8bit/train", None, "_leftImg8bit.png"),
    "voc": TrainSplit("VOCdevkit/VOC2012", "JPEGImages", "ImageSets/Segmentation/train.txt", ".jpg"),
}


def parse_dataset(spec: str) -> tuple[str, str]:
    """``ade20k=PATH`` → ("ade20k", "PATH"), or a one-line error naming the choices."""
    name, sep, path = spec.partition("=")
    name = name.strip().lower()
    if not sep or not path.strip():
        raise DatasetError(f"--dataset {spec!r}: expected NAME=PATH, e.g. ade20k=/data/ade")
    if name not in TRAIN_SPLITS:
        raise DatasetError(f"--dataset {spec!r}: unknown benchmark {name!r}; choose from {', '.join(TRAIN_SPLITS)}")
    return name, path.strip()


def dataset_images(name: str, root: str, storage_options: dict | None = None) -> list[ImageFile]:
    """The train images of benchmark ``name`` under ``root`` (the data_root or a folder above it)."""
    split = TRAIN_SPLITS[name]
    fs, path = _fs(root, storage_options)
    path = path.rstrip("/")
    base = next((c for c in (path, f"{path}/{split.data_root}") if fs.isdir(f"{c}/{split.img_dir}")), None)
    if base is None:
        raise DatasetError(f"--dataset {name}: no image folder at {show_url(root)}/{split.img_dir} (nor "
                           f"{show_url(root)}/{split.data_root}/{split.img_dir})")
    img_dir = f"{base}/{split.img_dir}"
    found = {p: info for p, info in fs.find(img_dir, detail=True).items() if p.endswith(split.suffix)}
    if split.split_file is not None:
        try:
            stems = fs.cat_file(f"{base}/{split.split_file}").decode("utf-8", "replace").split()
        except FileNotFoundError:
            raise DatasetError(f"--dataset {name}: no split file at {show_url(root)}/…/{split.split_file}") from None
        wanted = [f"{img_dir}/{s}{split.suffix}" for s in dict.fromkeys(stems)]
        missing = [p.rsplit("/", 1)[-1] for p in wanted if p not in found]
        if missing:
            log.warning("ingest: --dataset %s: %d image(s) listed in %s are missing (%s); skipped", name,
                        len(missing), split.split_file, few(missing, 3))
        found = {p: found[p] for p in wanted if p in found}
    if not found:
        raise DatasetError(f"--dataset {name}: no *{split.suffix} images under {show_url(img_dir)}")
    local = "://" not in root or root.startswith("file://")
    return [ImageFile(p if local else fs.unstrip_protocol(p), f"{name}/{p[len(base) + 1:]}", int(info.get("size") or 0),
                      info.get("type") == "file") for p, info in sorted(found.items())]


def file_rows(files: list[tuple[ImageFile, int]], max_pixels: int,
              storage_options: dict | None = None) -> tuple[list[dict], list[str]]:
    """Rows for (file, id) pairs, each read whole once; and one warning line per rejected file.

    A file that is gone, unreadable or not a regular file (a broken link, a FIFO) is a rejected
    row; any other read error (the store not answering) raises, so the batch is redone later.
    """
    rows, warnings = [], []
    for f, image_id in files:
        where = show_url(f.url)
        if not f.regular:
            r = row(image_id, f.url, f.member, 0, 0, "rejected", "not a regular file (a broken link, FIFO or device)")
        else:
            fs, path = _fs(f.url, storage_options)
            try:
                data = fs.cat_file(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
                r = row(image_id, f.url, f.member, 0, 0, "rejected", f"unreadable file ({first_line(e, 100, typed=True)})")
            else:
                status, reason, w, h, checksum = check_image(data, max_pixels)
                r = row(image_id, f.url, f.member, 0, len(data), status, reason, w, h, checksum)
        if r["status"] == "rejected":
            warnings.append(f"{where}: {r['reason']}; rejected")
        rows.append(r)
    return rows, warnings
