"""The one Python door to a SPAR student: ``spar_pipeline.load(SOURCE)`` gives a ready Backbone.

SOURCE is tried in this order:

- ``hf-hub:org/name``: a folder ``spar-pipeline export`` pushed to the Hugging Face Hub, read
  through ``huggingface_hub`` (from the local cache when offline, else one clear line);
- an exported folder (``spar_config.json`` next to the weights);
- a run, ``RUN`` or ``RUN:STUDENT``: the student's best weights (``resolve_student``);
- a weights file (safetensors, or a torch state dict) with ``backbone=NAME``;
- a backbone name (``tiny-siglip``, ``siglip2-b16-512``, ...): its pretrained weights.

What comes back is the usual :class:`~spar_pipeline.backbones.Backbone` (``dense``,
``encode_text``, ``class_embeddings``) in eval mode, plus ``features(image)`` and
``segment(image, classes)`` that take a PIL image, a path or a uint8 array and do the
resizing and normalisation themselves.

``resolve_student`` gathers a run's student (weights, best-epoch info, teacher fingerprint); where a
student name's weights live is ``weights.student_checkpoint``'s alone to say.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from spar_pipeline.checkpoint_names import BEST_INFO, BEST_OPEN_CLIP
from spar_pipeline.errors import SparError
from spar_pipeline.weights import DEFAULT_STUDENT  # the run's one student (evaluate rows call it "best")

__all__ = ["load", "model_for", "resolve_student", "split_student", "StudentFiles", "LoadError", "SPAR_CONFIG"]

SPAR_CONFIG = "spar_config.json"


class LoadError(SparError, ValueError):
    """A SOURCE that names no student, run, folder or weights; the message says what would."""


@dataclass(frozen=True)
class StudentFiles:
    """Where one student of a run lives, as local files (copied from an object-store run)."""

    run_url: str
    name: str  # DEFAULT_STUDENT or a named student
    label: str  # the student's model label in the evaluate manifest
    backbone: str
    weights: str  # Backbone state dict (build(backbone, weights))
    open_clip_weights: str | None  # the wrapped open_clip model's own state dict, when the family has one
    info: dict[str, Any] = field(default_factory=dict)  # best.json: epoch, step, val_mse, baseline_val_mse
    teacher: dict[str, Any] = field(default_factory=dict)  # the teacher fingerprint the student learned from


def split_student(source: str) -> tuple[str, str | None]:
    """``RUN:STUDENT`` -> (RUN, STUDENT); a plain ``RUN`` (also ``s3://b/run``, ``C:\\run``) -> (RUN, None)."""
    head, sep, tail = source.rpartition(":")
    if not sep or not head or not tail or "/" in tail or "\\" in tail or len(head) == 1:
        return source, None
    return head, tail


def resolve_student(run, student: str | None = None) -> StudentFiles:
    """The files of ``student`` (default: the run's one student; "best" means it too) in ``run`` (a Run
    or its URL). Where a name's weights live is ``weights.student_checkpoint``'s to say; the rest of
    the student (best.json, the open_clip file) sits next to them."""
    from spar_pipeline.run import Run
    from spar_pipeline.weights import student_checkpoint

    run = Run(run) if isinstance(run, str) else run
    name = DEFAULT_STUDENT if student in (None, "", "best") else student
    parts = student_checkpoint(run, name)  # one-line errors: an unknown name, a student not trained yet
    folder = parts[:-1]
    info = json.loads(run.read_bytes(*folder, BEST_INFO)) if run.exists(*folder, BEST_INFO) else {}
    oc = run.exists(*folder, BEST_OPEN_CLIP)
    return StudentFiles(
        run_url=run.url, name=name, label="best" if name == DEFAULT_STUDENT else name,
        backbone=info.get("backbone") or run.recipe.recipe.backbone, weights=_local(run, *parts),
        open_clip_weights=_local(run, *folder, BEST_OPEN_CLIP) if oc else None,
        info=info, teacher=_teacher(run, name),
    )


def load(source: str | os.PathLike, *, backbone: str | None = None, device: str | torch.device | None = None):
    """The student (or backbone) SOURCE names, with ``features`` and ``segment``; see the module docstring."""
    from spar_pipeline.backbones import build, list_backbones

    text = str(source)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if text.startswith("hf-hub:"):
        return _ready(_from_folder(_hub_folder(text[len("hf-hub:"):]), dev))
    if os.path.isfile(os.path.join(text, SPAR_CONFIG)):
        return _ready(_from_folder(text, dev))
    run_url, student = split_student(text)
    if _is_run(run_url):
        files = resolve_student(run_url, student)
        return _ready(build(backbone or files.backbone, files.weights, device=dev))
    if os.path.isfile(text):
        if not backbone:
            raise LoadError(f"{text}: a weights file needs the backbone it belongs to, e.g. "
                            f"load({text!r}, backbone='siglip2-b16-512'); available: {', '.join(list_backbones())}")
        return _ready(build(backbone, text, device=dev))
    if text in list_backbones():
        return _ready(build(text, device=dev))
    raise LoadError(f"{text}: not an exported folder ({SPAR_CONFIG}), a run (run.toml), a weights file, "
                    f"hf-hub:ORG/NAME or a backbone name ({', '.join(list_backbones())})")


def model_for(checkpoint: str = "pretrained", *, run=None, backbone: str | None = None,
              device: str | torch.device | None = None):
    """A command's ``--checkpoint``: "pretrained", "best" (needs ``run``) or a weights file, built for
    ``backbone`` (default: the run's); anything else is a ``load`` SOURCE (an exported folder,
    ``RUN:STUDENT``, ``hf-hub:ORG/NAME``). Default device: the GPU when there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if checkpoint in ("pretrained", "best") or (os.path.isfile(checkpoint) and not os.path.isdir(checkpoint)):
        from spar_pipeline.weights import load_models

        _, model = load_models(backbone, checkpoint, run, device, need_pretrained=False)
        return _ready(model)
    return load(checkpoint, backbone=backbone, device=device)


# ---- the convenience methods -----------------------------------------------------------------
class _Usable:
    """``features`` and ``segment`` on any Backbone: images in, maps and labels out."""

    @torch.no_grad()
    def features(self, image, *, mode: str = "single", stride: int | None = None,
                 scale: float = 1.0) -> torch.Tensor:
        """Dense features float32 ``[h, w, D]`` on the CPU (not normalised) of one image: a PIL image, a
        path or uint8 RGB ``[H, W, 3]``, resized by ``scale``; ``mode`` "sliding" needs ``stride``."""
        from spar_pipeline.features import dense_map, image_array

        return dense_map(self, image_array(image), mode=mode, stride=stride, scale=scale)

    @torch.no_grad()
    def segment(self, image, classes: Sequence[str], *, logit_scale: float = 40.0, prob_thd: float = 0.0,
                mode: str = "single", stride: int | None = None, scale: float = 1.0) -> np.ndarray:
        """Label map int64 ``[H, W]`` (the image's own size) over ``classes``: one class a string,
        synonyms ", "-separated; put a background class first and set ``prob_thd`` to send unsure
        pixels to it. Text: the 80 ImageNet templates, as in evaluation."""
        from spar_pipeline.datasets import templates
        from spar_pipeline.features import image_array, scaled
        from spar_pipeline.recipe import DatasetEval
        from spar_pipeline.segment import predict

        classes = [c for c in classes if c.strip()]
        if not classes:
            raise LoadError("segment: no classes given; e.g. segment(image, ['background', 'road', 'car', 'sky'])")
        if mode == "sliding" and not stride:
            raise LoadError("segment: mode 'sliding' needs a stride, e.g. stride=24")
        rgb = image_array(image)
        text = self.class_embeddings(classes, templates())
        cfg = DatasetEval(logit_scale=logit_scale, prob_thd=prob_thd)
        label = predict(self, scaled(rgb, scale), text, cfg, None, mode, stride)
        if label.shape != rgb.shape[:2]:
            import cv2

            label = cv2.resize(label.astype(np.int32), (rgb.shape[1], rgb.shape[0]),
                               interpolation=cv2.INTER_NEAREST).astype(np.int64)
        return label


_CLASSES: dict[type, type] = {}


def _ready(b):
    """The same object, its class extended with ``_Usable`` (weights and state dict untouched)."""
    cls = type(b)
    if not issubclass(cls, _Usable):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(cls.__name__, (cls, _Usable), {"__module__": cls.__module__,
                                                                "__doc__": cls.__doc__})
        b.__class__ = _CLASSES[cls]
    return b.eval()


# ---- sources ---------------------------------------------------------------------------------
def _from_folder(folder: str, device: torch.device):
    from spar_pipeline.backbones import build

    path = Path(folder, SPAR_CONFIG)
    try:
        config = json.loads(path.read_text())
        name, weights = config["backbone"], config["weights"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{path}: not a spar-pipeline export ({type(e).__name__}: {e})") from None
    file = Path(folder, weights)
    if not file.is_file():
        raise LoadError(f"{file}: missing; the folder {folder} is not a complete export")
    return build(name, str(file), device=device)


def _hub_folder(repo_id: str) -> str:
    """The repository's files in the local Hugging Face cache (downloaded first when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from spar_pipeline.errors import first_line

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LoadError(f"hf-hub:{repo_id}: expected hf-hub:ORG/NAME")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(repo_id, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise LoadError(f"hf-hub:{repo_id}: not in the local Hugging Face cache"
                        + (" and the Hub is offline (HF_HUB_OFFLINE)" if offline else " and the Hub did not answer")
                        + f"; on a connected machine run `hf download {repo_id}`, or load the exported folder") from None
    except Exception as e:  # a repository that does not exist, no network, an HTTP error
        raise LoadError(f"hf-hub:{repo_id}: {first_line(e)}") from None


def _is_run(url: str) -> bool:
    from spar_pipeline.run import RUN_FILE, Run

    if "://" not in url and not os.path.isdir(url):
        return False
    try:
        return Run(url).exists(RUN_FILE)
    except Exception:  # noqa: BLE001 - an unreachable URL is simply not a run here
        return False


def _teacher(run, name: str) -> dict[str, Any]:
    """The fingerprint of the teacher student ``name`` learned from (its teacher.toml)."""
    teacher = (run.student(name).settings or {}).get("teacher", "default")
    return dict(run.teacher(teacher).fingerprint or {})


def _local(run, *parts: str) -> str:
    if run.local:
        return run.path(*parts)
    local = os.path.join(tempfile.mkdtemp(prefix="spar-student-"), parts[-1])
    run.fs.get(run.path(*parts), local)
    return local
