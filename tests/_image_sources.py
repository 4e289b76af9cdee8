"""Test sources other than SA-1B tars: folders of image files, WebDataset shards, benchmark train splits."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from spar_pipeline.datasets import make_synthetic
from spar_pipeline.mini.sa1b_writer import encode, synthetic_image

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(i: int, size: tuple[int, int] = (48, 32), ext: str = "jpg", seed: int = 0) -> bytes:
    kw = {"lossless": True} if ext == "webp" else {}
    return encode(synthetic_image(i, size, seed), FORMATS[ext], **kw)


def image_folder(root: Path, n: int, size: tuple[int, int] = (48, 32), start: int = 0, seed: int = 0) -> list[Path]:
    """``n`` images cycling jpg/png/webp, half of them one folder down: root/img_000.jpg, root/sub/img_001.png, …"""
    paths = []
    for i in range(start, start + n):
        ext = list(FORMATS)[i % 3]
        path = root / ("sub" if i % 2 else "") / f"img_{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i, size, ext, seed))
        paths.append(path)
    return paths


def wds_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: for each (key, {ext: bytes}), members ``key.ext`` in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def wds_shard(path: Path, n: int, start: int = 0, size: tuple[int, int] = (48, 32)) -> Path:
    """``n`` samples ``{i:06d}`` each with an image (jpg/png/webp in turn), a class label and a caption."""
    return wds_tar(path, [(f"{i:06d}", {list(FORMATS)[i % 3]: image_bytes(i, size, list(FORMATS)[i % 3], seed=7),
                                        "cls": str(i % 5).encode(), "txt": b"a caption"})
                          for i in range(start, start + n)])


def train_splits(root: Path, n: int = 2, size: tuple[int, int] = (40, 56)) -> dict[str, Path]:
    """ade20k, cityscapes and voc in their mmseg layouts with ``n`` train images each (from the
    synthetic val layouts of spar_pipeline.datasets, moved to the train folders)."""
    out = {}
    for name, (bench, val, train) in {
        "ade20k": ("ade20k", "ADEChallengeData2016/images/validation", "ADEChallengeData2016/images/training"),
        "cityscapes": ("cityscapes", "cityscapes/leftImg8bit/val", "cityscapes/leftImg8bit/train"),
        "voc": ("voc21", None, None),
    }.items():
        base = make_synthetic(bench, root / name, n=n, size=size, seed=len(out))
        if val:
            shutil.move(str(base / val), str(base / train))
        else:
            sets = base / "VOCdevkit/VOC2012/ImageSets/Segmentation"
            (sets / "train.txt").write_text((sets / "val.txt").read_text())
        out[name] = base
    return out
