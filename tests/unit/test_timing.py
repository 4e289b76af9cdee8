"""The timed image size is a recipe field: the paper's 1024×2048 in its presets, scaled as the window in the
small CPU worlds; evaluate rows and the held-out look take it from the recipe; older runs keep theirs."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
import tomli_w

from spar_pipeline import evaluate, timing
from spar_pipeline.recipe import RecipeError, load_recipe, recipe_from_dict, recipe_to_dict
from spar_pipeline.run import Run, RunError

from _evaluate_fakes import Clock, CountingWindows, OneHot, striped_voc  # tests/ is on sys.path (tests/conftest.py)


def test_presets_time_the_papers_size_or_it_scaled_as_the_window():
    for name in ("siglip2-b16", "siglip2-b16-extended", "openclip-b16-maskclip", "dinov3txt-l16"):
        assert load_recipe(name).evaluate.timing_size == timing.PAPER_SIZE == (1024, 2048)
    for name in ("mini", "tiny-cpu"):
        r = load_recipe(name)
        scale = r.extract.window / 512  # the paper's window K = 512 (siglip2-b16)
        assert r.evaluate.timing_size == tuple(int(v * scale) for v in timing.PAPER_SIZE) == (128, 256)


@pytest.mark.parametrize("bad", [[0, 256], [128], [128, 256, 3], [128.5, 256], "128x256", [True, 256]])
def test_timing_size_must_be_two_positive_integers(bad):
    data = recipe_to_dict(load_recipe("mini"))
    data["evaluate"]["timing_size"] = bad
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, "stages/x.toml")
    assert "\n" not in str(err.value) and str(err.value).startswith("stages/x.toml [evaluate].timing_size")


def test_a_run_frozen_before_timing_size_keeps_the_papers_size_and_accepts_its_recipe(tmp_path):
    run = Run(str(tmp_path / "old"))
    run.resolve_recipe("mini")
    path = tmp_path / "old" / "run.toml"
    data = tomllib.loads(path.read_text())
    del data["evaluate"]["timing_size"]  # as run.toml was written before the key existed
    path.write_text(tomli_w.dumps(data))
    again = Run(str(tmp_path / "old"))
    assert again.resolve_recipe("mini").evaluate.timing_size == (1024, 2048)  # what it was timed at
    assert Run(str(tmp_path / "old")).recipe.evaluate.timing_size == (1024, 2048)
    # a recorded key that differs is still refused, naming it (and not the unrecorded one)
    mini = load_recipe("mini")
    other = dataclasses.replace(mini, evaluate=dataclasses.replace(mini.evaluate, timing_warmup=5))
    with pytest.raises(RunError, match=r"differs in: evaluate\.timing_warmup\. "):
        Run(str(tmp_path / "old")).resolve_recipe(other)
    fresh = Run(str(tmp_path / "new"))  # a new run records the key, so a change of it is drift
    fresh.resolve_recipe("mini")
    paper = dataclasses.replace(mini, evaluate=dataclasses.replace(mini.evaluate, timing_size=(1024, 2048)))
    with pytest.raises(RunError, match=r"differs in: evaluate\.timing_size\. "):
        Run(str(tmp_path / "new")).resolve_recipe(paper)


def test_evaluate_rows_and_the_look_time_at_the_recipes_size(tmp_path, monkeypatch):
    from spar_pipeline.report import look_speeds

    recipe = load_recipe("tiny-cpu")
    recipe = dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, resize=(96, 64),
                                                                       timing_warmup=0, timing_size=(80, 112)))
    clock = Clock()
    model = CountingWindows(clock)
    rows = evaluate.run(None, {"voc21": str(striped_voc(tmp_path))}, modes=("single",), backbone=model,
                        recipe=recipe)
    assert [(r["forward_height"], r["forward_width"]) for r in rows] == [(80, 112)]
    assert (1, 3, 80, 112) in model.shapes
    rows = evaluate.run(None, {"voc21": str(striped_voc(tmp_path))}, modes=("single",), backbone=OneHot(),
                        recipe=recipe, timing_size=(48, 64))  # an explicit size still wins
    assert [(r["forward_height"], r["forward_width"]) for r in rows] == [(48, 64)]

    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(recipe)
    model.shapes.clear()
    timing._MEASURED.clear()
    monkeypatch.setattr(timing.time, "perf_counter", clock)  # one second per window forwarded
    seconds = look_speeds(run, model, model)
    assert (1, 3, 80, 112) in model.shapes and not any(s[2:] == (1024, 2048) for s in model.shapes)
    # tiny-cpu's strides 24 and 32 over 80×112 with the 48 window of OneHot: 3×4 and 2×3 windows, 1 s each
    assert seconds == {"single (student)": 1.0, "sliding s=24 (teacher)": 12.0, "sliding s=32 (teacher)": 6.0}
