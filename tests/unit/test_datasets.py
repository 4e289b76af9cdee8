"""The six benchmarks in their mmseg layouts: listing, label conventions, shipped class names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spar_pipeline import datasets
from spar_pipeline.datasets import DatasetError, get_dataset, get_spec, list_datasets, make_synthetic
from spar_pipeline.recipe import load_recipe

CLASSES = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "ade20k": 150, "cityscapes": 19}


def test_registry_lists_the_six():
    assert list_datasets() == list(CLASSES)


@pytest.mark.parametrize("name", list(CLASSES))
def test_layout_loads_with_label_convention(tmp_path, name):
    root = make_synthetic(name, tmp_path, n=3, size=(40, 56), seed=1)
    spec = get_spec(name)
    for given in (root, root / spec.data_root):  # the parent or the data_root itself
        bench = get_dataset(name, given)
        assert len(bench) == 3 and bench.num_classes == CLASSES[name]
    for i, (image, label, stem) in enumerate(bench):
        assert image.dtype == np.uint8 and image.shape == (40, 56, 3)
        assert label.dtype == np.int64 and label.shape == (40, 56)
        raw = np.array(Image.open(bench.items[i][2])).astype(np.int64)
        if spec.reduce_zero_label:
            want = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        else:
            want = raw
        np.testing.assert_array_equal(label, want)
        valid = label[label != 255]
        assert valid.size and valid.min() >= 0 and valid.max() < CLASSES[name]
        assert (label[0] == 255).all()
        assert stem == bench.items[i][0]


def test_reduce_zero_label_by_hand(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.array([[0, 1, 2, 255]], np.uint8)).save(path)
    np.testing.assert_array_equal(datasets.load_label(path, True), [[255, 0, 1, 255]])
    np.testing.assert_array_equal(datasets.load_label(path, False), [[0, 1, 2, 255]])


def test_voc_palette_annotations_keep_indices(tmp_path):
    make_synthetic("voc21", tmp_path, n=1)
    bench = get_dataset("voc21", tmp_path)
    assert Image.open(bench.items[0][2]).mode == "P"
    _, label, _ = bench[0]
    assert set(np.unique(label)) <= set(range(21)) | {255}


def test_cityscapes_names_and_resize(tmp_path):
    make_synthetic("cityscapes", tmp_path, n=3)
    bench = get_dataset("cityscapes", tmp_path / "cityscapes")
    stem, img, ann = bench.items[0]
    assert stem == "frankfurt/frankfurt_000000_000019"
    assert img.name == "frankfurt_000000_000019_leftImg8bit.png" and img.parent.name == "frankfurt"
    assert ann.name == "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    cfg = load_recipe("siglip2-b16").evaluate
    assert datasets.resize_scale("cityscapes", cfg) == (2048, 1024)
    assert datasets.resize_scale("ade20k", cfg) == (2048, 672)


def test_shipped_class_names_and_templates():
    voc21 = datasets.class_lines("voc21")
    assert len(voc21) == 21 and len(voc21[0].split(", ")) == 26 and voc21[0].startswith("sky, wall")
    assert sum(len(c.split(", ")) for c in voc21) == 56
    assert sum(len(c.split(", ")) for c in datasets.class_lines("voc20")) == 30
    assert datasets.class_lines("context60")[-1] == "wood "  # the trailing space is kept
    for name, n in CLASSES.items():
        assert len(datasets.class_lines(name)) == n
    tmpl = datasets.templates()
    assert len(tmpl) == 80 and all("{}" in t for t in tmpl) and tmpl[0] == "a bad photo of a {}."


def test_errors_name_choices_and_paths(tmp_path):
    with pytest.raises(DatasetError, match="voc21, voc20, context60"):
        get_dataset("coco", tmp_path)
    with pytest.raises(DatasetError, match=str(tmp_path / "ADEChallengeData2016" / "images/validation")):
        get_dataset("ade20k", tmp_path)
    make_synthetic("voc21", tmp_path, n=2)
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.write_text(split.read_text() + "2008_999999\n")
    with pytest.raises(DatasetError, match="2008_999999.jpg is listed but missing"):
        get_dataset("voc21", tmp_path)
