"""Recipes: every preset loads, and each kind of mistake is one error naming file and key."""

from __future__ import annotations

import tomllib

import pytest

from spar_pipeline.recipe import (
    RecipeError,
    list_recipes,
    load_recipe,
    recipe_diff,
    recipe_from_dict,
    recipe_to_dict,
)
from spar_pipeline.resources import stages_dir

PRESETS = ["tiny-cpu", "siglip2-b16", "siglip2-b16-extended", "openclip-b16-maskclip", "dinov3txt-l16"]


def test_all_presets_present():
    assert set(PRESETS) <= set(list_recipes())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_round_trips(name):
    r = load_recipe(name)
    assert r.name == name
    again = recipe_from_dict(recipe_to_dict(r))
    assert again == r and again.fingerprint == r.fingerprint


def test_paper_numbers():
    r = load_recipe("siglip2-b16")
    assert (r.extract.window, r.extract.stride, r.extract.window_batch) == (512, 24, 10)
    assert r.augment.scale == (2048, 1024) and r.augment.ratio_range == (0.5, 1.0)
    assert (r.train.lr, r.train.weight_decay, r.train.epochs, r.train.batch_size) == (2e-5, 1e-4, 10, 1)
    assert r.train.trainable == "blk_-1,blk_-2" and r.ingest.max_id == 25000
    assert r.evaluate.datasets["voc21"].logit_scale == 65 and r.evaluate.datasets["context60"].prob_thd == 0.1
    ext = load_recipe("siglip2-b16-extended")
    assert ext.augment.scale == (2560, 2560) and ext.augment.ratio_range == (0.2, 1.0)
    mc = load_recipe("openclip-b16-maskclip")
    assert mc.extract.window == 224 and mc.evaluate.datasets["voc21"].area_thd == 0.1
    assert load_recipe("dinov3txt-l16").extract.window == 384


def _data(name="tiny-cpu"):
    return tomllib.loads((stages_dir() / f"{name}.toml").read_text())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["extract"].__setitem__("stride", 0), r"\[extract\]\.stride=0: must be ≥ 1"),
        (lambda d: d["extract"].pop("stride"), r"\[extract\]\.stride: missing"),
        (lambda d: d["extract"].__setitem__("strdie", 3), r"\[extract\]\.strdie: unknown key; allowed: window, stride"),
        (lambda d: d["augment"].__setitem__("prob_flip", 1.5), r"\[augment\]\.prob_flip=1.5: must be in \[0, 1\]"),
        (lambda d: d["extract"].__setitem__("precision", "fp8"), r"must be one of fp16, bf16, fp32"),
        (lambda d: d["augment"].__setitem__("scale", [1, 2, 3]), r"\[augment\]\.scale.*must have 2 items"),
        (lambda d: d["train"].__setitem__("epochs", "ten"), r"\[train\]\.epochs='ten': must be an integer"),
        (lambda d: d.pop("train"), r"\[train\]: missing"),
        (lambda d: d["augment"].__setitem__("min_side", 32), r"min_side=32: must be ≥ \[extract\]\.window=64"),
        (lambda d: d["evaluate"]["datasets"]["voc21"].__setitem__("prob_thd", -1.0), r"voc21\]\.prob_thd=-1.0"),
    ],
)
def test_bad_values_name_file_and_key(mutate, expected):
    d = _data()
    mutate(d)
    with pytest.raises(RecipeError, match=expected) as e:
        recipe_from_dict(d, "stages/tiny-cpu.toml")
    assert str(e.value).startswith("stages/tiny-cpu.toml")


def test_unknown_preset_lists_choices():
    with pytest.raises(RecipeError, match="available: .*tiny-cpu"):
        load_recipe("no-such-recipe")


def test_bad_toml_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[recipe\nname=")
    with pytest.raises(RecipeError, match="broken.toml: not valid TOML"):
        load_recipe(str(p))


def test_recipe_from_path_and_diff(tmp_path):
    text = (stages_dir() / "tiny-cpu.toml").read_text().replace("stride = 24", "stride = 32")
    p = tmp_path / "mine.toml"
    p.write_text(text)
    mine = load_recipe(str(p))
    assert mine.extract.stride == 32
    assert recipe_diff(load_recipe("tiny-cpu"), mine) == ["extract.stride"]


def test_the_default_students_seeds_are_swept_over_scales():
    """`run` evaluates the default student and its other seeds (not the other students) at every
    [evaluate] scale, so Fig. 3 can draw the seeds' spread."""
    from spar_pipeline.pipeline import _seed_of_default
    from spar_pipeline.recipe import load_recipe

    plans = {s.name: s for s in load_recipe("mini-paper").students}
    swept = sorted(n for n, s in plans.items() if _seed_of_default(s, plans.get("default")))
    assert swept == ["default-seed1", "default-seed2"]
