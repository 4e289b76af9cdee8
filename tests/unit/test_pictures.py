"""The pictures and exports a user looks at: valid PNGs of the expected size, a features .npy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spar_pipeline import pictures


@pytest.fixture(scope="module")
def tiny():
    from spar_pipeline.backbones import build

    return build("tiny-siglip")


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (70, 100, 3)).astype(np.uint8)
    arr[:35] = (30, 120, 220)  # a flat "sky" half
    path = tmp_path / "img.jpg"
    Image.fromarray(arr).save(path)
    return str(path)


def test_parse_classes():
    assert pictures.parse_classes("road, car ,sky") == ["road", "car", "sky"]
    assert pictures.parse_classes("background; person, man ; car") == ["background", "person, man", "car"]


def test_colours_follow_the_demo_seed():
    np.random.seed(42)
    want = np.random.randint(0, 255, (5, 3))
    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    np.testing.assert_array_equal(pictures.class_colours(5), want)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global RNG is left alone


def test_segment_png(tmp_path, image_path, tiny):
    out = tmp_path / "out" / "seg.png"
    info = pictures.segment_image(image_path, ["background", "road, street", "car", "sky"], str(out), backbone=tiny,
                               prob_thd=0.3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (100, 70) and im.mode == "RGB"
    assert info["present"] and set(info["present"]) <= {"background", "road", "car", "sky"}


def test_overlay_blends_and_legends():
    image = np.full((40, 60, 3), 200, np.uint8)
    label = np.zeros((40, 60), np.int64)
    label[:, 30:] = 2
    picture, present = pictures.overlay(image, label, ["a", "b", "c"], font_size=8)
    assert present == ["a", "c"] and picture.shape == (40, 60, 3)
    colours = pictures.class_colours(3)
    np.testing.assert_allclose(picture[-1, 0], (200 + colours[0].astype(float)) / 2, atol=1)


def test_features_npy(tmp_path, image_path, tiny):
    out = tmp_path / "f.npy"
    shape = pictures.features(image_path, str(out), backbone=tiny)
    arr = np.load(out, allow_pickle=False)
    assert shape == arr.shape == (5, 7, tiny.dim) and arr.dtype == np.float32  # ceil(70/16), ceil(100/16)


def test_pca_png_teacher_and_best_student(tmp_path, image_path, tiny):
    from safetensors.torch import save_file

    from spar_pipeline.run import Run

    out = tmp_path / "pca.png"
    info = pictures.pca_image(image_path, str(out), backbone=tiny, stride=24)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * 96, 64)  # 100×70 snapped to 96×64, two panels
    assert info["student"] == "pretrained"

    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    (tmp_path / "run" / "students" / "default" / "checkpoints").mkdir(parents=True)
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    save_file(state, str(tmp_path / "run" / "students" / "default" / "checkpoints" / "best.safetensors"))
    info = pictures.pca_image(image_path, str(out), run=run, stride=32)
    assert info["student"] == "best" and Image.open(out).size == (192, 64)
