"""``spar-pipeline migrate``: move a run of the older layout into named teachers and students.

Before a run could hold many teachers and students it held one store and one student at its top:
``RUN/features.zarr``, ``RUN/manifests/extract/``, ``RUN/checkpoints/``, ``RUN/manifests/train/``.
They move to ``RUN/teachers/default/`` and ``RUN/students/default/`` (a rename on local disk; a
copy then a delete on object stores, through fsspec), and the settings files the newer layout keeps
are written from what the run recorded: the teacher's [extract] from run.toml with the store's
fingerprint; the student's [train] from run.toml with what its newest checkpoint says it trained
(``trainable``, ``images_per_step``, the number of training images, the trainable parameter count)
and the epochs its train manifest reached. Cut short, it is run again: a move whose copy was cut
copies again over what landed, then deletes the old.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import tomli_w

from spar_pipeline.fsutil import redact
from spar_pipeline.run import DEFAULT, STORE, STUDENT_FILE, STUDENTS, TEACHER_FILE, TEACHERS, Run

__all__ = ["migrate", "MOVES"]

log = logging.getLogger(__name__)

MOVES = (  # (old parts, new parts), relative to the run
    ((STORE,), (TEACHERS, DEFAULT, STORE)),
    (("manifests", "extract"), (TEACHERS, DEFAULT, "manifests", "extract")),
    (("checkpoints",), (STUDENTS, DEFAULT, "checkpoints")),
    (("manifests", "train"), (STUDENTS, DEFAULT, "manifests", "train")),
)
_CKPT = re.compile(r"^ckpt-(\d{9})\.json$")


def migrate(run: Run) -> list[str]:
    """Move what ``run.legacy()`` lists; returns one line per thing done."""
    if not run.legacy():
        return [f"{redact(run.url)}: already in the current layout (teachers/, students/); nothing to move"]
    done = []
    for old, new in MOVES:
        if run.exists(*old):
            _move(run, old, new)
            done.append(f"{'/'.join(old)} -> {'/'.join(new)}")
    teacher, student = run.teacher(DEFAULT), run.student(DEFAULT)  # the layout check passes now
    if teacher.settings is None and (teacher.exists(STORE) or teacher.exists("manifests", "extract")):
        teacher.freeze(dataclasses.asdict(run.recipe.extract), _fingerprint(run))
        done.append(f"wrote {TEACHERS}/{DEFAULT}/{TEACHER_FILE}")
    if student.settings is None and (student.exists("checkpoints") or student.exists("manifests", "train")):
        settings, extra = _student_settings(run)
        student.freeze(settings, **extra)
        done.append(f"wrote {STUDENTS}/{DEFAULT}/{STUDENT_FILE}")
    log.info("migrate: %s", "; ".join(done))
    return done


def _move(run: Run, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    src, dst = run.path(*old), run.path(*new)
    parent = dst.rsplit("/", 1)[0]
    if run.local and not os.path.exists(dst):
        os.makedirs(parent, exist_ok=True)
        os.replace(src, dst)  # one rename: nothing half-moved
        return
    files = run.fs.find(src)  # object store: copy every object (over a copy cut short), then delete the old
    if files:
        run.fs.copy(files, [dst + f[len(src):] for f in files])
    run.fs.rm(src, recursive=True)


def _fingerprint(run: Run) -> dict:
    """The moved store's fingerprint, else the one the older layout kept in run.toml."""
    from spar_pipeline.store import FeatureStore

    teacher = run.teacher(DEFAULT)
    if teacher.exists(STORE):
        fp = FeatureStore.open(teacher.store_url, storage_options=run.storage_options).fingerprint
        if fp:
            return fp
    return dict((run.read_toml("run.toml") or {}).get("teacher") or {})


def _student_settings(run: Run) -> tuple[dict, dict]:
    """(settings, extra) of the older layout's one student, from run.toml, its newest checkpoint and
    its train manifest."""
    from spar_pipeline import manifest

    recipe, student = run.recipe, run.student(DEFAULT)
    settings = {**dataclasses.asdict(recipe.train), "teacher": DEFAULT, "seed": recipe.recipe.seed}
    extra: dict = {}
    head = _newest_head(student)
    if head is not None:
        state = head.get("state") or {}
        data, progress = state.get("data") or {}, state.get("progress") or {}
        settings["trainable"] = data.get("trainable", settings["trainable"])
        settings["images_per_step"] = progress.get("images_per_step", progress.get("world", 1))
        if data.get("n_train"):
            settings["images"] = int(data["n_train"])
        params = _tensor_sizes(student, head, state.get("model") or {})
        if params is not None:
            extra["trainable_params"] = params
    epochs = manifest.read_manifest(student, "train")["epoch"].to_pylist()
    settings["epochs"] = max([settings["epochs"], *(e + 1 for e in epochs)])
    if "images" not in settings:
        from spar_pipeline.split import training_items

        settings["images"] = len(training_items(run)[0])
    return settings, extra


def _newest_head(student) -> dict | None:
    try:
        names = [p.rsplit("/", 1)[-1] for p in student.fs.ls(student.checkpoints, detail=False)]
    except FileNotFoundError:
        return None
    steps = sorted(int(m.group(1)) for m in map(_CKPT.match, names) if m)
    for step in reversed(steps):
        try:
            return json.loads(student.read_bytes("checkpoints", f"ckpt-{step:09d}.json"))
        except (ValueError, UnicodeDecodeError, FileNotFoundError):
            continue
    return None


def _tensor_sizes(student, head: dict, model: dict) -> int | None:
    """Element count of the checkpoint's trainable weights, from its safetensors header alone."""
    keys = [v["__tensor__"] for v in model.values() if isinstance(v, dict) and "__tensor__" in v]
    path = student.path("checkpoints", f"ckpt-{int(head['step']):09d}.safetensors")
    try:
        with student.fs.open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return sum(math.prod(header[k]["shape"]) for k in keys if k in header)
