"""The miniature world: scenes whose labels match their pixels, deterministic writers, the
``scenes`` benchmark layout, the ``mini`` recipe on scene tars, and shipped mini-clip weights
that load offline and beat chance at the native resolution."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from spar_pipeline.mini.scenes import (CLASS_LINES, COLOURS, SHAPES, class_index, make_scene,
                                       make_scene_benchmark, make_scene_source, make_scene_tar)

ASSET = Path(__file__).resolve().parents[2] / "spar_pipeline" / "assets" / "mini-clip.safetensors"


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of each pixel's closest colour by direction in RGB (shade-invariant)."""
    ref = np.array(list(COLOURS.values()), np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    p = pixels.astype(np.float32) + 1e-3
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return (p @ ref.T).argmax(1)


@pytest.mark.parametrize("size", [(64, 64), (200, 120), (96, 256)])
def test_labels_match_pixels(size):
    names = list(COLOURS)
    for index in range(6):
        sc = make_scene(5, index, size, n_objects=(2, 6))
        assert sc.image.shape == (size[1], size[0], 3) and sc.label.shape == (size[1], size[0])
        assert sc.label.max() < len(CLASS_LINES)
        for cls in np.unique(sc.label[sc.label > 0]):
            colour, shape = CLASS_LINES[cls].split()
            assert class_index(colour, shape) == cls
            under = sc.image[sc.label == cls]
            # Every labelled pixel has its class's colour (plain, stripe or dot shade).
            agree = (_nearest_colour(under) == names.index(colour)).mean()
            assert agree > 0.98, (index, CLASS_LINES[cls], agree)
        # Background pixels are the muted backgrounds, never an object's bright colour.
        bg = sc.image[sc.label == 0].astype(np.int32)
        assert bg.size and (bg.max(1) < 200).mean() > 0.99
        # The caption names only objects that are there, and names each kind once per instance.
        for o in sc.objects:
            if o.visible and f"{o.colour} {o.shape}" in sc.caption:
                assert (sc.label == o.label).any()
        assert sc.caption.endswith(f"on {sc.background}")


def test_scenes_are_deterministic(tmp_path):
    a, b = make_scene(3, 7, (120, 80)), make_scene(3, 7, (120, 80))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.caption == b.caption
    assert not np.array_equal(a.image, make_scene(3, 8, (120, 80)).image)
    assert not np.array_equal(a.image, make_scene(4, 7, (120, 80)).image)
    t1 = make_scene_tar(tmp_path / "a.tar", [1, 2], seed=0)
    t2 = make_scene_tar(tmp_path / "b.tar", [1, 2], seed=0)
    assert hashlib.sha256(t1.read_bytes()).digest() == hashlib.sha256(t2.read_bytes()).digest()


def test_benchmark_reads_like_any_dataset(tmp_path):
    from spar_pipeline.datasets import get_dataset, list_datasets

    assert "scenes" not in list_datasets() and "scenes" in list_datasets(include_synthetic=True)
    make_scene_benchmark(tmp_path, n=4, seed=1)
    bench = get_dataset("scenes", tmp_path)
    assert len(bench) == 4 and bench.num_classes == len(CLASS_LINES) == 1 + len(COLOURS) * len(SHAPES)
    image, label, name = bench[0]
    assert image.shape[:2] == label.shape == (384, 512) and label.max() < bench.num_classes
    # k = 512·384 // 20000 = 9: 5–11 objects, 64–100 px at the native size
    assert np.array_equal(label, make_scene(1, 0, (512, 384), (5, 11), (64, 101)).label)


def test_mini_recipe_ingests_scene_tars(tmp_path):
    from spar_pipeline import augment, ingest
    from spar_pipeline.manifest import read_manifest
    from spar_pipeline.run import Run

    tars = make_scene_source(tmp_path / "src", n_tars=1, per_tar=3, seed=0)
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("mini")
    assert run.recipe.recipe.backbone == "mini-clip" and run.recipe.extract.window == 64
    ingest.run(run, tars)
    augment.run(run)
    rows = read_manifest(run, "augment").to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert all(min(r["height"], r["width"]) >= 64 for r in rows)


@pytest.mark.parametrize("name", ["mini-clip", "mini-clip-rope"])
def test_shipped_weights_load_offline_and_beat_chance(tmp_path, name):
    import torch

    from spar_pipeline import evaluate
    from spar_pipeline.backbones import build
    from spar_pipeline.datasets import get_dataset
    from spar_pipeline.metrics import SegMetric
    from spar_pipeline.recipe import load_recipe

    torch.set_num_threads(2)
    shipped = sorted(ASSET.parent.glob("*.safetensors"))
    assert ASSET.with_name(f"{name}.safetensors") in shipped
    assert sum(f.stat().st_size for f in shipped) <= 20 << 20  # issue 21's budget for weights in the package
    b = build(name)
    assert (b.patch_size, b.window, b.dim) == (8, 64, 96)
    from spar_pipeline.backbones import _construct, get_spec

    torch.manual_seed(0)
    assert b.weights_digest != _construct(name, get_spec(name)).weights_digest  # not random init

    make_scene_benchmark(tmp_path, n=24, seed=77, sizes=[(256, 192)])  # resized to (128, 96): objects 32–50 px
    recipe = load_recipe("mini")
    recipe = dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, resize=(128, 96)))
    rows = evaluate.run(None, {"scenes": str(tmp_path)}, recipe=recipe, backbone=b)
    chance = SegMetric(len(CLASS_LINES))
    for _, label, _ in get_dataset("scenes", tmp_path):
        chance.update(np.zeros_like(label), label)  # the majority class everywhere
    floor = float(chance.compute()["miou"])
    assert rows[0]["miou"] > floor + 5.0, (rows[0]["miou"], floor)


def test_hard_negative_changes_one_shape_and_nothing_else():
    from spar_pipeline.mini.pretrain import _negative

    changed = 0
    for index in range(40):
        sc = make_scene(0, index, (64, 64), n_objects=(1, 3), object_size=(16, 32))
        bad = _negative(sc, np.random.default_rng(index))
        diff = [(a, b) for a, b in zip(sc.caption.split(), bad.split()) if a != b]
        assert len(bad.split()) == len(sc.caption.split()) and len(diff) <= 1, (sc.caption, bad)
        if diff:
            (a, b), = diff
            assert a.rstrip(",") in SHAPES and b.rstrip(",") in SHAPES and a != b
            changed += 1
        else:
            assert sc.caption == sc.background  # nothing named: nothing to swap
    assert changed >= 30  # most scenes name an object, and its negative names another shape


def test_pretraining_is_a_pure_function_of_its_seed(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from spar_pipeline.mini import pretrain

    a = pretrain.main(tmp_path / "a.safetensors", seed=3, steps=2, pool=300)
    b = pretrain.main(tmp_path / "b.safetensors", seed=3, steps=2, pool=300)
    c = pretrain.main(tmp_path / "c.safetensors", seed=4, steps=2, pool=300)
    assert a["steps"] == 2 and not a["capped"]
    wa, wb, wc = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "abc")
    assert wa.keys() == wb.keys() and all(torch_equal(wa[k], wb[k]) for k in wa)
    assert not all(torch_equal(wa[k], wc[k]) for k in wa)
    # --batch is part of the function: its value is recorded with the weights, and changes them
    pretrain.main(tmp_path / "d.safetensors", seed=3, steps=2, pool=300, batch=8)
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert f.metadata()["batch"] == "8"
        assert not all(torch_equal(wa[k], f.get_tensor(k)) for k in wa)


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))
