"""Which weights a model is built from: the one place that turns (backbone, checkpoint, run) into models.

``checkpoint`` is "pretrained" (the recipe's base weights, else the backbone's own), a student's
name (its best epoch, copied to a local file for an object-store run; ``student_checkpoint`` is the one
place a name becomes a file), "best" (the default student, the name older runs and callers use) or a
weights file. ``backbone`` is a name (default: the run's recipe backbone), or a Backbone already
built, used as the pretrained model. The pretrained model is also what gives text features, so a
student that fine-tuned its text tower never changes them (see docs/reference.md).
"""

from __future__ import annotations

import os
import tempfile

import torch

from spar_pipeline.checkpoint_names import BEST as BEST_FILE
from spar_pipeline.errors import EvaluateError
from spar_pipeline.run import STUDENTS, Run

__all__ = ["BEST", "DEFAULT_BACKBONE", "DEFAULT_STUDENT", "UnknownStudent", "student_checkpoint",
           "resolve_checkpoint", "pretrained_model", "load_models"]

DEFAULT_STUDENT = "default"  # the student "best" means
BEST = (STUDENTS, DEFAULT_STUDENT, "checkpoints", BEST_FILE)  # the default student's best epoch
DEFAULT_BACKBONE = "siglip2-b16-512"  # without a run or a --backbone


class UnknownStudent(EvaluateError):
    """A name that is not one of the run's students (it may still be a weights file)."""


def student_checkpoint(run: Run, name: str) -> tuple[str, ...]:
    """Parts (``run.path(*parts)``) of student ``name``'s best-epoch weights: the one place a student
    name becomes a file. Unknown names raise ``UnknownStudent`` naming the known ones; a known student
    not trained yet is refused with the command that trains it.

    Where the weights are is ``Run.student(name).best_weights`` (``RUN/students/<name>/checkpoints/
    best.safetensors``). The known students: ``default`` (the recipe's [train]), those with a
    student.toml (``Run.students``) and those the recipe lists (``[[students]]``, maybe not trained yet)."""
    known = sorted({DEFAULT_STUDENT, *run.students(), *(p.name for p in run.recipe.students)})
    if name not in known:
        raise UnknownStudent(f"{run.url}: no student {name!r} (students: {', '.join(known)})")
    best = run.student(name).best_weights
    parts = tuple(best.removeprefix(run.path() + "/").split("/"))  # relative to the run: run.path(*parts)
    if not run.exists(*parts):
        flag = "" if name == DEFAULT_STUDENT else f" --student {name}"
        raise EvaluateError(f"{run.url_for(*parts)}: no best checkpoint yet for student {name!r}; "
                            f"run `spar-pipeline train --run {run.url}{flag}` first")
    return parts


def resolve_checkpoint(run: Run | None, checkpoint: str) -> str | None:
    """A local weights file for a student name or "best" (its best epoch, copied from a remote run) or
    a path; None for "pretrained". A run's student name wins over a file of the same name."""
    if checkpoint == "pretrained":
        return None
    name = DEFAULT_STUDENT if checkpoint == "best" else checkpoint
    if run is None:
        if checkpoint == "best" or not os.path.isfile(checkpoint):
            raise EvaluateError(f"--checkpoint {checkpoint}: no such file, and a student name needs --run; "
                                "use pretrained, a student name with --run, or a weights file")
        return checkpoint
    try:
        parts = student_checkpoint(run, name)
    except UnknownStudent as e:
        if checkpoint == "best" or not os.path.isfile(checkpoint):
            raise UnknownStudent(f"--checkpoint {checkpoint}: no such file, and {e}; use pretrained, "
                                 "a student name or a weights file") from None
        return checkpoint
    if run.local:
        return run.path(*parts)
    local = os.path.join(tempfile.mkdtemp(prefix="spar-ckpt-"), parts[-1])
    run.fs.get(run.path(*parts), local)
    return local


def pretrained_model(backbone, recipe, device: torch.device):
    """(the pretrained Backbone on ``device`` in eval mode, its name). ``recipe`` (or None) gives the
    default name and the base weights (``recipe.checkpoint``)."""
    from spar_pipeline.backbones import build

    if backbone is not None and not isinstance(backbone, str):
        return backbone.to(device).eval(), backbone.name
    name = _name(backbone, recipe)
    base = recipe.recipe.checkpoint if recipe is not None else ""
    return build(name, base or None, device=device), name


def load_models(backbone, checkpoint: str, run: Run | None, device=None, need_pretrained: bool = True,
                model=None):
    """(pretrained, model with the checkpoint): the same object for "pretrained"; the first is None
    when not needed (only the checkpoint is then built). ``model``: the checkpoint's model already
    built, used as it is. ``device``: default the GPU when there is one."""
    from spar_pipeline.backbones import build

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = None if model is not None else resolve_checkpoint(run, checkpoint)
    recipe = run.recipe if run is not None else None
    if path is not None and not need_pretrained and (backbone is None or isinstance(backbone, str)):
        return None, build(_name(backbone, recipe), path, device=dev)
    base, name = pretrained_model(backbone, recipe, dev)
    if model is not None:
        return base, model.to(dev).eval()
    return base, base if path is None else build(name, path, device=dev)


def _name(backbone: str | None, recipe) -> str:
    return backbone or (recipe.recipe.backbone if recipe is not None else DEFAULT_BACKBONE)
