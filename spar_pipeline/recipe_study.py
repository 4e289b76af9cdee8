"""A recipe's study lists: ``[[teachers]]`` and ``[[students]]`` tables, parsed and checked.

The shape (documented with an example in recipe.py): a teacher is a name and the ``[extract]`` keys
it changes; a student is a name, the ``[train]`` keys it changes, and optionally ``teacher`` (a
``[[teachers]]`` name), ``images`` (N images of the training split) and ``seed`` or ``seeds``
(``seeds = [0, 1, 2]`` makes ``NAME-seed0``, ``NAME-seed1``, ``NAME-seed2``). Names are also folder
names (``RUN/teachers/<name>/``, ``RUN/students/<name>/``), hence their few characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from spar_pipeline.errors import RecipeError

__all__ = ["TeacherPlan", "StudentPlan", "valid_name", "teacher_plans", "student_plans", "study_to_dict", "LABELS"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LABELS = ("pretrained", "best")  # evaluate's model labels: no student may take them
STUDENT_KEYS = ("name", "teacher", "images", "seed", "seeds")  # besides the [train] keys


def valid_name(name: Any) -> bool:
    """1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    return isinstance(name, str) and bool(_NAME.match(name))


@dataclass(frozen=True)
class TeacherPlan:
    """A ``[[teachers]]`` table: a named teacher and the [extract] keys it changes (e.g. stride)."""

    name: str
    extract: dict[str, Any]


@dataclass(frozen=True)
class StudentPlan:
    """A ``[[students]]`` table (``seeds`` expanded): a named student over ``teacher``, trained on
    ``images`` images of the split (None: all) with epoch-order ``seed`` (None: the recipe's) and
    the [train] keys it changes."""

    name: str
    teacher: str = "default"
    images: int | None = None
    seed: int | None = None
    train: dict[str, Any] = field(default_factory=dict)


def _tables(value: Any, key: str, source: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecipeError(f"{source} [[{key}]]: must be tables ([[{key}]] then name = ...)")
    for i, t in enumerate(value):
        if not valid_name(t.get("name")):
            raise RecipeError(f"{source} [[{key}]] #{i + 1}: name={t.get('name')!r}: needs a name of 1 to 64 "
                              "letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def teacher_plans(value: Any, recipe, source: str) -> tuple[TeacherPlan, ...]:
    """``[[teachers]]`` of ``recipe`` (its other tables already parsed), each checked as an [extract]."""
    from spar_pipeline.recipe import extract_config

    out: list[TeacherPlan] = []
    for t in _tables(value, "teachers", source):
        name, keys = t["name"], {k: v for k, v in t.items() if k != "name"}
        where = f"[teachers.{name}]"
        if name == "default":
            raise RecipeError(f"{source} {where}: the recipe's [extract] is teacher default; pick another name")
        if any(p.name == name for p in out):
            raise RecipeError(f"{source} {where}: listed twice")
        if not keys:
            raise RecipeError(f"{source} {where}: changes no [extract] key (e.g. stride = 16)")
        extract_config(recipe.extract, keys, where, source)
        out.append(TeacherPlan(name, keys))
    return tuple(out)


def _seeds(keys: dict[str, Any], where: str, source: str) -> tuple[list[int | None], bool]:
    """(the seeds, whether they came from ``seeds``, so that each makes a NAME-seedN student)."""
    seed, seeds = keys.pop("seed", None), keys.pop("seeds", None)
    if seed is not None and seeds is not None:
        raise RecipeError(f"{source} {where}: give seed or seeds, not both")
    listed = [seed] if seeds is None else seeds
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(listed, list) or not listed or not all(v is None or ok(v) for v in listed):
        key, got, what = (("seed", seed, "an integer") if seeds is None else
                          ("seeds", seeds, "a non-empty list of integers"))
        raise RecipeError(f"{source} {where}.{key}={got!r}: must be {what} ≥ 0")
    if len(set(listed)) != len(listed):
        raise RecipeError(f"{source} {where}.seeds={seeds!r}: a seed is listed twice")
    return listed, seeds is not None


def student_plans(value: Any, recipe, teachers: set[str], source: str) -> tuple[StudentPlan, ...]:
    """``[[students]]`` of ``recipe``, seeds expanded; each student's [train] keys checked as a [train]."""
    from dataclasses import fields

    from spar_pipeline.recipe import TrainConfig, train_config

    train_keys = {f.name for f in fields(TrainConfig)}
    out: list[StudentPlan] = []
    for t in _tables(value, "students", source):
        name, keys = t["name"], {k: v for k, v in t.items() if k != "name"}
        where = f"[students.{name}]"
        teacher, images = keys.pop("teacher", "default"), keys.pop("images", None)
        if teacher not in teachers:
            raise RecipeError(f"{source} {where}.teacher={teacher!r}: not a teacher of this recipe "
                              f"(teachers: {', '.join(sorted(teachers))}; add a [[teachers]] table)")
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise RecipeError(f"{source} {where}.images={images!r}: must be an integer ≥ 1")
        seeds, expand = _seeds(keys, where, source)
        unknown = sorted(set(keys) - train_keys)
        if unknown:
            raise RecipeError(f"{source} {where}.{unknown[0]}: unknown key; allowed: {', '.join(STUDENT_KEYS)} "
                              "and the [train] keys")
        if "holdout_fraction" in keys:
            raise RecipeError(f"{source} {where}.holdout_fraction: the held-out slice is the run's ([train]), the "
                              "same for every student so that their val_mse compare")
        train_config(recipe.train, keys, where, source)
        for s in seeds:
            full = f"{name}-seed{s}" if expand else name
            if full in LABELS:
                raise RecipeError(f"{source} {where}: {full} is a model label of evaluate; pick another name")
            if any(p.name == full for p in out):
                raise RecipeError(f"{source} {where}: student {full} is listed twice")
            out.append(StudentPlan(full, teacher, images, s, dict(keys)))
    return tuple(out)


def study_to_dict(recipe) -> dict[str, list[dict[str, Any]]]:
    """The lists in their TOML shape (seeds expanded, each student with its seed); empty lists left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    if recipe.teachers:
        out["teachers"] = [{"name": t.name, **t.extract} for t in recipe.teachers]
    if recipe.students:
        out["students"] = [{"name": s.name, **({"teacher": s.teacher} if s.teacher != "default" else {}),
                            **({"images": s.images} if s.images is not None else {}),
                            **({"seed": s.seed} if s.seed is not None else {}), **s.train}
                           for s in recipe.students]
    return out
