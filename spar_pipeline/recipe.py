"""Recipes: the TOML presets in ``stages/`` loaded into frozen, typed objects.

A recipe is the one place where the paper's numbers live, so the dataclasses below give
defaults only to operational knobs (worker counts, codecs); every number of the method is
a required key and a missing one is an error naming the file and the key.

A recipe may also list the study it makes over one run (``spar-pipeline run`` extracts every
teacher once and trains every student, each resuming); the recipe's ``[extract]`` is teacher
``default`` and, without ``[[students]]``, its ``[train]`` is the one student ``default``::

    [[teachers]]            # another teacher over the same images: a name and the [extract] keys it changes
    name = "s16"
    stride = 16

    [[students]]            # a name, the [train] keys it changes, and optionally:
    name = "blk1"
    trainable = "blk_-1"
    teacher = "s16"         # a [[teachers]] name (default: "default")
    images = 1250           # train on N images of the run's training split (a nested seeded subset; default all)
    seeds = [0, 1, 2]       # one student per seed, named blk1-seed0, blk1-seed1, blk1-seed2 (or seed = N)

The two lists are not part of the recipe's fingerprint: a run's images and teachers do not depend
on them, and each student freezes its own settings in ``RUN/students/<name>/student.toml``, so a
recipe that only adds students is accepted by a run that has one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spar_pipeline.errors import RecipeError
from spar_pipeline.recipe_study import (StudentPlan, TeacherPlan, student_plans, study_to_dict, teacher_plans,
                                        valid_name)
from spar_pipeline.resources import stages_dir
from spar_pipeline.store import CODECS, MAP_DTYPES

__all__ = [
    "RecipeError",
    "Recipe",
    "list_recipes",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_fingerprint",
    "recipe_diff",
    "TeacherPlan",
    "StudentPlan",
    "valid_name",
    "extract_config",
    "train_config",
]

STUDY = ("teachers", "students")  # the recipe's study lists, outside its fingerprint


def _positive(v: Any) -> str | None:
    return None if v >= 1 else "must be ≥ 1"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be ≥ 0"


def _probability(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _pair_positive(v: Any) -> str | None:
    return None if len(v) == 2 and all(x >= 1 for x in v) else "must be two numbers ≥ 1"


def _ratio_range(v: Any) -> str | None:
    return None if len(v) == 2 and 0 < v[0] <= v[1] else "must be [low, high] with 0 < low ≤ high"


def _scales(v: Any) -> str | None:
    return None if len(v) >= 1 and all(x > 0 for x in v) else "must be a non-empty list of numbers > 0"


def _choice(*allowed: str):
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _check(fn):
    return {"check": fn}


@dataclass(frozen=True)
class RecipeInfo:
    name: str  # preset name, shown in reports
    backbone: str  # a name of spar_pipeline.backbones.list_backbones()
    seed: int = field(metadata=_check(_non_negative))  # drives every random draw (augment, split, order)
    checkpoint: str = ""  # weights: "", a local file, or an open_clip pretrained tag


@dataclass(frozen=True)
class IngestConfig:
    max_id: int = field(metadata=_check(_non_negative))  # keep sa_<id> with id ≤ max_id; 0 keeps all
    max_pixels: int = field(metadata=_check(_positive))  # decompression-bomb limit, pixels per image
    workers: int = field(default=2, metadata=_check(_positive))  # tars decoded in parallel


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[int, int] = field(metadata=_check(_pair_positive))  # RandomResize target (long, short)
    ratio_range: tuple[float, float] = field(metadata=_check(_ratio_range))  # r ~ U[low, high)
    min_side: int = field(metadata=_check(_positive))  # every final side ≥ this (the window K)
    prob_crop: float = field(metadata=_check(_probability))  # crop instead of the full image
    crop_min_frac: float = field(metadata=_check(_probability))  # crop side ~ U[frac·L, L]
    snap: int = field(metadata=_check(_positive))  # sides snapped down to a multiple of this
    prob_flip: float = field(metadata=_check(_probability))  # horizontal flip


@dataclass(frozen=True)
class ExtractConfig:
    window: int = field(metadata=_check(_positive))  # teacher window K (the backbone's native size)
    stride: int = field(metadata=_check(_positive))  # teacher stride s (paper: 24)
    window_batch: int = field(metadata=_check(_positive))  # windows per forward, may span images
    precision: str = field(metadata=_check(_choice("fp16", "bf16", "fp32")))  # autocast dtype (CPU: bf16 only)
    images_per_task: int = field(default=8, metadata=_check(_positive))  # images in one unit of work
    # teacher-map codec. "none" reads at ~0.96x a plain file's speed; "blosc" (zstd over bit-shuffled
    # float16) is 0.89x the bytes but reads ~10x slower (bench/bench_read.py, bench/bench_store.py)
    codec: str = field(default="none", metadata=_check(_choice(*CODECS)))
    codec_level: int = field(default=3, metadata=_check(_non_negative))
    # stored map precision: "int8" (per-channel scale) is ~half the bytes; error in bench/bench_quant.py
    store_dtype: str = field(default="float16", metadata=_check(_choice(*MAP_DTYPES)))
    retries: int = field(default=3, metadata=_check(_non_negative))  # a failed batch is retried this often


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(metadata=_check(_positive))
    lr: float = field(metadata=_check(lambda v: None if v > 0 else "must be > 0"))
    weight_decay: float = field(metadata=_check(_non_negative))
    batch_size: int = field(metadata=_check(_positive))  # per device; the method uses 1
    # images per optimizer step (the effective batch): each of P processes accumulates images_per_step / P
    # micro-steps of one image, so 1, 2 or 4 devices take the same steps; P must divide it (reference: 2)
    images_per_step: int = field(metadata=_check(_positive))
    trainable: str  # set_trainable spec, e.g. "blk_-1,blk_-2"
    precision: str = field(metadata=_check(_choice("fp16", "bf16", "fp32")))  # autocast dtype on GPU
    # images never trained on, for val_mse and the best epoch; 0: none (the reference), best = last epoch
    holdout_fraction: float = field(metadata=_check(_probability))
    # "shuffle" (default): a fresh seeded permutation each epoch; "sorted": the same sorted order every
    # epoch, interleaved across processes (the reference's)
    order: str = field(default="shuffle", metadata=_check(_choice("shuffle", "sorted")))
    checkpoint_every: int = field(default=200, metadata=_check(_positive))  # steps between checkpoints
    loader_workers: int = field(default=2, metadata=_check(_non_negative))


@dataclass(frozen=True)
class DatasetEval:
    logit_scale: float
    logit_bias: float = 0.0
    prob_thd: float = field(default=0.0, metadata=_check(_probability))
    area_thd: float = field(default=0.0, metadata=_check(_probability))  # 0 = off


@dataclass(frozen=True)
class EvaluateConfig:
    resize: tuple[int, int] = field(metadata=_check(_pair_positive))  # keep-ratio resize (long, short)
    cityscapes_resize: tuple[int, int] = field(metadata=_check(_pair_positive))
    window_batch: int = field(metadata=_check(_positive))  # sliding sub-batch (paper: 60)
    strides: tuple[int, ...]  # sliding-window strides evaluated
    timing_warmup: int = field(metadata=_check(_non_negative))  # passes before the timed one
    datasets: dict[str, DatasetEval] = field(default_factory=dict)
    # (height, width) of the image forward_seconds is timed on (docs/reference.md, "Inference timing");
    # the default is the paper's 1024×2048, what runs frozen before this key existed were timed at
    timing_size: tuple[int, int] = field(default=(1024, 2048), metadata=_check(_pair_positive))
    # factors of the evaluation size `run` evaluates at (Fig. 3's resolution axis; 1.0 always is): pretrained
    # and the default student's single pass at each, and sliding at each of scale_strides (a sliding pass
    # per scale each: the costly part; none by default)
    scales: tuple[float, ...] = field(default=(1.0,), metadata=_check(_scales))
    scale_strides: tuple[int, ...] = field(default=(), metadata=_check(lambda v: None if all(x >= 1 for x in v)
                                                                          else "must be strides ≥ 1"))


@dataclass(frozen=True)
class Recipe:
    recipe: RecipeInfo
    ingest: IngestConfig
    augment: AugmentConfig
    extract: ExtractConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    teachers: tuple[TeacherPlan, ...] = ()  # [[teachers]]: teachers besides "default"
    students: tuple[StudentPlan, ...] = ()  # [[students]]: what `run` trains (none: the default student)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def fingerprint(self) -> str:
        return recipe_fingerprint(self)


def _convert(cls: type, data: Any, where: str, source: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} [{where}]: must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(
            f"{source} [{where}].{unknown[0]}: unknown key; allowed: {', '.join(fields)}"
            if where
            else f"{source} [{unknown[0]}]: unknown table; allowed: {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{source} [{where}].{name}" if where else f"{source} [{name}]"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{key}: missing (required)")
            continue
        values[name] = _coerce(hints[name], data[name], key, where, name, source)
        check = f.metadata.get("check")
        if check is not None:
            problem = check(values[name])
            if problem:
                raise RecipeError(f"{key}={data[name]!r}: {problem}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, where: str, name: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _convert(hint, value, f"{where}.{name}" if where else name, source)
    if origin is dict:
        _, vt = typing.get_args(hint)
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: must be a table")
        return {k: _coerce(vt, v, f"{key}.{k}", f"{where}.{name}", k, source) for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise RecipeError(f"{key}={value!r}: must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key, where, name, source) for v in value)
        if len(value) != len(args):
            raise RecipeError(f"{key}={value!r}: must have {len(args)} items")
        return tuple(_coerce(a, v, key, where, name, source) for a, v in zip(args, value))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}={value!r}: must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}={value!r}: must be an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}={value!r}: must be a string")
        return value
    raise RecipeError(f"{key}: unsupported type {hint}")  # pragma: no cover - schema bug


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    """Typed recipe from a plain dict (a parsed TOML file or a frozen run.toml)."""
    data = dict(data)
    study = {k: data.pop(k, []) for k in STUDY}
    recipe = _convert(Recipe, data, "", source)
    ex = recipe.extract
    if recipe.augment.min_side < ex.window:
        raise RecipeError(
            f"{source} [augment].min_side={recipe.augment.min_side}: must be ≥ [extract].window={ex.window}"
        )
    _window_covered(ex, "[extract]", source)
    teachers = teacher_plans(study["teachers"], recipe, source)
    students = student_plans(study["students"], recipe, {"default", *(t.name for t in teachers)}, source)
    return dataclasses.replace(recipe, teachers=teachers, students=students)


def _window_covered(ex: ExtractConfig, where: str, source: str) -> None:
    if ex.stride > ex.window:
        raise RecipeError(f"{source} {where}.stride={ex.stride}: must be ≤ [extract].window={ex.window} "
                          "(a larger stride leaves pixels in no window)")


def extract_config(base: ExtractConfig, settings: dict[str, Any], where: str = "[extract]",
                   source: str = "<recipe>") -> ExtractConfig:
    """``base`` with ``settings`` (a teacher's [extract] keys), checked as a recipe's [extract] is."""
    cfg = _convert(ExtractConfig, {**dataclasses.asdict(base), **settings}, where.strip("[]"), source)
    _window_covered(cfg, where, source)
    return cfg


def train_config(base: TrainConfig, settings: dict[str, Any], where: str = "[train]",
                 source: str = "<recipe>") -> TrainConfig:
    """``base`` with the [train] keys of ``settings`` (a student's; other keys ignored), checked as a
    recipe's [train] is."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    return _convert(TrainConfig, {**dataclasses.asdict(base), **{k: v for k, v in settings.items() if k in keys}},
                    where.strip("[]"), source)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in stages_dir().glob("*.toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a preset by name (``tiny-cpu``) or a TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix == ".toml" or not path.exists():
        candidate = stages_dir() / f"{name_or_path}.toml"
        if candidate.exists():
            path = candidate
        elif not path.exists():
            raise RecipeError(
                f"recipe {name_or_path!r}: not a file and not a preset; available: {', '.join(list_recipes())}"
            )
    source = f"stages/{path.name}" if path.parent == stages_dir() else str(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    return recipe_from_dict(data, source)


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain dict (lists, not tuples) that round-trips through TOML."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(dataclasses.asdict(dataclasses.replace(recipe, teachers=(), students=())))
    for key in STUDY:
        out.pop(key)
    return {**out, **plain(study_to_dict(recipe))}


def recipe_fingerprint(recipe: Recipe) -> str:
    """What a run freezes: every table but the study lists ([[teachers]], [[students]])."""
    data = {k: v for k, v in recipe_to_dict(recipe).items() if k not in STUDY}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ, e.g. ``extract.stride`` (the study lists left out, as from the fingerprint)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(prefix)

    walk(*({k: v for k, v in recipe_to_dict(r).items() if k not in STUDY} for r in (a, b)), "")
    return out
