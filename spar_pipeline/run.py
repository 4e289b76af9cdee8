"""The run folder: one URL that holds a study — the images, the teachers over them, the students over
those teachers, and the reports.

The teacher store is the expensive part (the paper: 9 GPU-hours for 25k images) and the method's
results are comparisons over it, so a run is the unit of a study rather than of one training::

    RUN/run.toml                              the frozen recipe + its fingerprint
    RUN/manifests/{ingest,augment}/           the images and their one-time augmentation: shared by all
    RUN/manifests/{evaluate,summary}/         rows keyed by model name; stage throughput
    RUN/teachers/<name>/teacher.toml          its frozen [extract] settings + the teacher fingerprint
    RUN/teachers/<name>/features.zarr         its store
    RUN/teachers/<name>/manifests/extract/    its extract manifest
    RUN/students/<name>/student.toml          its frozen settings: [train] + teacher, images, seed, trainable_params
    RUN/students/<name>/checkpoints/          step/epoch checkpoints, best.safetensors, best_open_clip.safetensors
    RUN/students/<name>/manifests/train/      its train manifest
    RUN/reports/

A :class:`Folder` is anything that holds manifests — the run, a teacher, a student — and the
manifest functions take one. ``Run.teacher(name)`` / ``Run.student(name)`` give the folders;
``Run.teachers()`` / ``Run.students()`` list the names that have a settings file (the one listing
of the run's folders, an index of names). The recipe's ``[extract]`` is teacher ``default`` and its
``[train]`` student ``default`` (over teacher ``default``). A settings file is written once, by the
first extract or train of that name; later calls resume it, and a call that asks other settings is
refused naming the keys (a student's ``epochs`` may grow, so a run can train further).

A run of the older layout (one ``RUN/features.zarr`` and ``RUN/checkpoints/`` at its top) is refused
in one line naming ``spar-pipeline migrate --run R`` (``spar_pipeline.migrate``), which moves it
into ``teachers/default`` and ``students/default``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from typing import Any

import tomli_w

from spar_pipeline.checkpoint_names import BEST
from spar_pipeline.errors import RunError
from spar_pipeline.fsutil import filesystem, is_local, redact, write_local_atomic
from spar_pipeline.recipe import Recipe, load_recipe, recipe_diff, recipe_from_dict, recipe_to_dict, valid_name
from spar_pipeline.recipe_study import LABELS, study_to_dict

__all__ = ["Folder", "Run", "RunError", "TeacherFolder", "StudentFolder", "STORE", "DEFAULT", "TEACHERS",
           "STUDENTS", "TEACHER_FILE", "STUDENT_FILE", "LEGACY"]

RUN_FILE = "run.toml"
STORE = "features.zarr"  # a teacher's feature store, inside its folder
DEFAULT = "default"  # the teacher of the recipe's [extract], the student of its [train]
TEACHERS, STUDENTS = "teachers", "students"
TEACHER_FILE, STUDENT_FILE = "teacher.toml", "student.toml"
LEGACY = (STORE, "checkpoints")  # at the run's top: the layout before named teachers and students
STUDY = ("teachers", "students")  # run.toml's study lists (outside the recipe's fingerprint)


def _recorded(data: dict, dotted: str) -> bool:
    """Whether the dotted key (``evaluate.timing_size``) is written in the frozen run.toml ``data``."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


class Folder:
    """A folder of the run (the run itself, a teacher's, a student's): paths, URLs and whole-or-nothing
    writes inside it; what the manifests and the checkpointer are given."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, parent: Folder | None = None,
                 parts: tuple[str, ...] = ()):
        if parent is not None:  # a sub-folder shares its parent's filesystem
            self.url, self.storage_options = parent.url_for(*parts), parent.storage_options
            self.fs, self.root = parent.fs, parent.path(*parts)
            return
        if re.match(r"^[\w+.-]+://[^/]*@", url):  # s3://key:secret@bucket would end up in logs and errors
            raise RunError(f"{redact(url)}: credentials in the run URL are not supported; "
                           "use the AWS_* variables or --storage-options")
        self.url = url.rstrip("/") if "://" in url else os.path.abspath(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.url)!r})"

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    def path(self, *parts: str) -> str:
        """Path inside ``self.fs``."""
        return "/".join([self.root.rstrip("/"), *parts])

    def url_for(self, *parts: str) -> str:
        """Full URL of a member, for components that open their own filesystem (the store)."""
        return "/".join([self.url, *parts])

    # ---- small I/O helpers shared by stages -------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        """Whole-or-nothing write: rename on local disk, one PUT on object stores."""
        target = self.path(*parts)
        if self.local:
            write_local_atomic(target, data)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def read_toml(self, *parts: str) -> dict[str, Any] | None:
        """A TOML file of this folder, None when it is not there."""
        try:
            return tomllib.loads(self.read_bytes(*parts).decode())
        except FileNotFoundError:
            return None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{redact(self.url_for(*parts))}: not valid TOML ({e})") from None


class Run(Folder):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        self._recipe: Recipe | None = None
        self._layout_checked = False

    def __repr__(self) -> str:
        return f"Run({redact(self.url)!r})"

    @property
    def store_url(self) -> str:
        """URL of the default teacher's store (``RUN/teachers/default/features.zarr``); another
        teacher's is ``run.teacher(name).store_url``."""
        return self.teacher().store_url

    # ---- teachers and students -------------------------------------------------------------
    def teacher(self, name: str = DEFAULT) -> TeacherFolder:
        """Teacher ``name``'s folder (it may not be extracted yet: see ``TeacherFolder.settings``)."""
        self._check_layout()
        return TeacherFolder(self, _named("--teacher", name))

    def student(self, name: str = DEFAULT) -> StudentFolder:
        """Student ``name``'s folder (it may not be trained yet: see ``StudentFolder.settings``)."""
        self._check_layout()
        if name in LABELS:
            raise RunError(f"--student {name}: {' and '.join(LABELS)} are evaluate's model labels; pick "
                           "another name")
        return StudentFolder(self, _named("--student", name))

    def teachers(self) -> list[str]:
        """Names of the teachers with a teacher.toml, sorted."""
        return self._names(TEACHERS, TEACHER_FILE)

    def students(self) -> list[str]:
        """Names of the students with a student.toml, sorted."""
        return self._names(STUDENTS, STUDENT_FILE)

    def _names(self, folder: str, settings_file: str) -> list[str]:
        self._check_layout()
        found = self.fs.glob(self.path(folder, "*", settings_file))
        return sorted(p.rstrip("/").rsplit("/", 2)[-2] for p in found)

    def legacy(self) -> list[str]:
        """What of the older layout this run holds at its top (``features.zarr``, ``checkpoints``,
        ``manifests/extract``, ``manifests/train``); empty for a run of the current layout."""
        def names(*parts: str) -> set[str]:
            try:
                self.fs.invalidate_cache(self.path(*parts))
                return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(*parts), detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                return set()

        top, manifests = names(), names("manifests")
        return [n for n in LEGACY if n in top] + [f"manifests/{s}" for s in ("extract", "train") if s in manifests]

    def _check_layout(self) -> None:
        if self._layout_checked:
            return
        old = self.legacy()
        if old:
            raise RunError(f"{redact(self.url)}: a run of the older layout ({', '.join(old)} at its top, before "
                           "named teachers and students); move it once with "
                           f"`spar-pipeline migrate --run {redact(self.url)}`")
        self._layout_checked = True

    # ---- recipe -------------------------------------------------------------------------
    def frozen_recipe(self) -> Recipe | None:
        if not self.exists(RUN_FILE):
            return None
        data = tomllib.loads(self.read_bytes(RUN_FILE).decode())
        data.pop("fingerprint", None)
        data.pop("teacher", None)
        return recipe_from_dict(data, source=f"{redact(self.url)}/{RUN_FILE}")

    def resolve_recipe(self, recipe: Recipe | str | None = None, default: str | None = None) -> Recipe:
        """The run's recipe: freeze the given one on first use (``default``, a preset, when none is given
        and none is frozen yet), refuse a different one later."""
        frozen = self.frozen_recipe()
        if recipe is None and frozen is None:
            recipe = default
        if isinstance(recipe, str):
            recipe = load_recipe(recipe)
        if frozen is None:
            if recipe is None:
                raise RunError(
                    f"{redact(self.url)}: no {RUN_FILE} yet; start the run with a recipe, e.g. --recipe tiny-cpu"
                )
            data = recipe_to_dict(recipe)
            data["fingerprint"] = recipe.fingerprint
            self.write_bytes_atomic(tomli_w.dumps(data).encode(), RUN_FILE)
            frozen = recipe
        elif recipe is not None and recipe.fingerprint != frozen.fingerprint:
            # a key run.toml predates (a field added later, with a default) is no drift: the run keeps
            # the default it ran with, e.g. [evaluate] timing_size of a run started before it existed
            data = tomllib.loads(self.read_bytes(RUN_FILE).decode())
            diff = recipe_diff(frozen, recipe)
            keys = ", ".join(k for k in diff if _recorded(data, k))
            if not keys:
                self._recipe = frozen
                return frozen
            raise RunError(
                f"{redact(self.url)} was started with recipe {frozen.name!r}; the given recipe differs in: {keys}. "
                "Use a new --run, or drop --recipe to continue with the frozen one."
            )
        if recipe is not None and (recipe.teachers, recipe.students) != (frozen.teachers, frozen.students):
            # the study lists are outside the fingerprint (each student freezes its own settings): a recipe
            # that adds teachers or students updates them in run.toml
            data = {k: v for k, v in tomllib.loads(self.read_bytes(RUN_FILE).decode()).items() if k not in STUDY}
            self.write_bytes_atomic(tomli_w.dumps({**data, **study_to_dict(recipe)}).encode(), RUN_FILE)
            frozen = dataclasses.replace(frozen, teachers=recipe.teachers, students=recipe.students)
        self._recipe = frozen
        return frozen

    @property
    def recipe(self) -> Recipe:
        if self._recipe is None:
            self._recipe = self.resolve_recipe(None)
        return self._recipe


def _named(flag: str, name: str) -> str:
    if not valid_name(name):
        raise RunError(f"{flag} {name!r}: a name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                       "letter or digit")
    return name


def _settle(folder: TeacherFolder | StudentFolder, file: str, base: dict[str, Any], given: dict[str, Any],
            grow: tuple[str, ...], hint: str) -> dict[str, Any]:
    """The settings of a teacher or student: ``base`` with what this call gives on first use, else the
    frozen ones; a given key that differs from the frozen value is refused naming the keys (those in
    ``grow`` may increase: the new value is taken)."""
    frozen = folder.settings
    if frozen is None:
        return {**base, **given}
    was = {k: frozen.get(k, base.get(k)) for k in given}
    drift = [k for k, v in given.items() if (v < was[k] if k in grow and was[k] is not None else v != was[k])]
    if drift:
        grows = f" ({', '.join(grow)} may only grow)" if set(drift) & set(grow) else ""
        raise RunError(
            f"{folder.kind} {folder.name} was frozen with {', '.join(f'{k}={was[k]!r}' for k in drift)} "
            f"({redact(folder.url_for(file))}); this call asks {', '.join(f'{k}={given[k]!r}' for k in drift)}"
            f"{grows}; nothing changed: {hint}")
    return {**base, **frozen, **{k: given[k] for k in grow if k in given}}


class TeacherFolder(Folder):
    """``RUN/teachers/<name>/``: teacher.toml (its [extract] settings and fingerprint), its store
    (``store_url``) and its extract manifest (``manifest.read_manifest(teacher, "extract")``)."""

    kind = "teacher"

    def __init__(self, run: Run, name: str):
        super().__init__(run.url, parent=run, parts=(TEACHERS, name))
        self.run, self.name = run, name

    @property
    def store_url(self) -> str:
        return self.url_for(STORE)

    @property
    def settings(self) -> dict[str, Any] | None:
        """Its frozen [extract] settings (teacher.toml without the fingerprint); None before its first extract."""
        data = self.read_toml(TEACHER_FILE)
        if data is not None:
            data.pop("fingerprint", None)
        return data

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return (self.read_toml(TEACHER_FILE) or {}).get("fingerprint")

    def plan(self, base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """Its [extract] settings: ``base`` (the recipe's) with ``given`` on first use, else the frozen ones;
        a given key that differs from them is refused, naming it."""
        return _settle(self, TEACHER_FILE, base, given, (), "name another teacher, e.g. --teacher "
                       + "-".join(f"{k[0]}{v}" for k, v in sorted(given.items())))

    def freeze(self, settings: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        """Write teacher.toml once (settings + fingerprint); a different fingerprint later is refused."""
        if self.check(fingerprint):
            self.write_bytes_atomic(tomli_w.dumps({**settings, "fingerprint": fingerprint}).encode(), TEACHER_FILE)

    def check(self, fingerprint: dict[str, Any]) -> bool:
        """Whether teacher.toml is still to be written; refuses one that holds another fingerprint."""
        data = self.read_toml(TEACHER_FILE)
        if data is None:
            return True
        old = data.get("fingerprint") or {}
        if old != fingerprint:
            keys = ", ".join(k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k))
            raise RunError(f"{redact(self.url)}: the teacher differs from the one teacher {self.name} was extracted "
                           f"with ({keys}); name another --teacher")
        return False


class StudentFolder(Folder):
    """``RUN/students/<name>/``: student.toml (its frozen settings), its checkpoints and best student
    (``checkpoints``, ``best_weights``) and its train manifest (``manifest.read_manifest(student, "train")``)."""

    kind = "student"
    GROW = ("epochs",)  # a student may train further; every other setting stays as first frozen

    def __init__(self, run: Run, name: str):
        super().__init__(run.url, parent=run, parts=(STUDENTS, name))
        self.run, self.name = run, name

    @property
    def settings(self) -> dict[str, Any] | None:
        """student.toml: [train] + teacher, images, seed, trainable_params; None before its first train."""
        return self.read_toml(STUDENT_FILE)

    @property
    def checkpoints(self) -> str:
        """Path (in ``fs``) of its checkpoint folder."""
        return self.path("checkpoints")

    @property
    def best_weights(self) -> str:
        """Path (in ``fs``) of its best epoch's weights, ``best.safetensors``."""
        return self.path("checkpoints", BEST)

    def plan(self, base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """Its settings: ``base`` with ``given`` on first use, else the frozen ones (epochs may grow); a
        given key that differs from them is refused, naming it."""
        return _settle(self, STUDENT_FILE, base, given, self.GROW, "use another --student name, or "
                       "--no-resume to start this one over")

    def freeze(self, settings: dict[str, Any], **extra: Any) -> None:
        """Write student.toml on first use; later only a grown ``epochs`` and keys it lacks (``extra``:
        e.g. ``trainable_params``, known once the model is built) are added."""
        data = self.read_toml(STUDENT_FILE)
        new = {**settings, **extra} if data is None else {
            **{k: v for k, v in extra.items() if k not in data}, **data,
            **{k: settings[k] for k in self.GROW if k in settings}}
        if new != data:
            self.write_bytes_atomic(tomli_w.dumps(new).encode(), STUDENT_FILE)
