"""Training checkpoints: when to save, what to keep, and loading without pickle.

A checkpoint is two files under ``RUN/checkpoints/``: ``ckpt-<step>.safetensors`` (every
tensor of the state, flattened to dotted keys) and ``ckpt-<step>.json`` (the rest of the
state tree, the tensor file's sha256 and size). Both go through ``Run.write_bytes_atomic``,
the JSON last, so the JSON is the completion marker: a checkpoint without one, or whose
tensor file does not match its hash, is skipped with a warning and the previous one is used.
Loading parses JSON and safetensors only, never pickle.

The checkpointer owns the interval and the retention (torchtitan's ``keep_latest_k``): a
step checkpoint every ``every`` steps, the latest ``keep_latest_k`` of them kept; every
epoch-end checkpoint is kept (the best one is always among them). It also exports the best
student: ``best.safetensors`` (the whole backbone, for ``build(name, checkpoint=...)``),
``best_open_clip.safetensors`` (open_clip families: the wrapped model in open_clip's key layout)
and ``best.json`` (which epoch, its val_mse), written in that order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from spar_pipeline.checkpoint_names import BEST, BEST_INFO, BEST_OPEN_CLIP
from spar_pipeline.errors import CheckpointError, first_line
from spar_pipeline.fsutil import redact
from spar_pipeline.run import Run

__all__ = ["Checkpointer", "CheckpointError", "encode_state", "decode_state", "BEST", "BEST_OPEN_CLIP", "BEST_INFO"]

log = logging.getLogger(__name__)

FORMAT = 1
FOLDER = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{9})\.(json|safetensors)$")


# ---- state tree <-> (JSON tree, flat tensors) ----------------------------------------------
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able tree of ``obj``; tensors (and numpy arrays) are moved into ``tensors``.

    Dicts with non-string keys (optimizer state), tuples (RNG states) and arrays keep their
    type through a small tag, so ``decode_state`` gives back what ``load_state_dict`` expects.
    """
    if isinstance(obj, torch.Tensor):
        key = path or "_"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = path or "_"
        wide = np.int64 if obj.dtype.kind in "iu" else obj.dtype  # safetensors has no uint32
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(wide))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[k, encode_state(v, tensors, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"checkpoint state at {path or '<root>'}: cannot store a {type(obj).__name__}")


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy().astype(tree["dtype"])
        if "__items__" in tree:
            return {k: decode_state(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(decode_state(v, tensors) for v in tree["__tuple__"])
        return {k: decode_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    return tree


@dataclass(frozen=True)
class Entry:
    step: int
    epoch_end: bool
    meta: dict

    @property
    def name(self) -> str:
        return f"ckpt-{self.step:09d}"


class Checkpointer:
    """Saves ``state_fn()`` at a fixed step interval and at epoch ends; only where ``enabled``
    (rank 0) does it write, but every rank calls ``save`` so a collective inside ``state_fn``
    runs everywhere."""

    def __init__(self, run: Run, state_fn: Callable[[], dict], *, every: int, keep_latest_k: int = 2,
                 enabled: bool = True):
        if every < 1 or keep_latest_k < 1:
            raise ValueError(f"checkpoint every={every}, keep_latest_k={keep_latest_k}: both must be ≥ 1")
        self.run, self.state_fn, self.enabled = run, state_fn, enabled
        self.every, self.keep_latest_k = every, keep_latest_k

    # ---- saving ---------------------------------------------------------------------------
    def due(self, step: int, epoch_end: bool = False) -> bool:
        return epoch_end or step % self.every == 0

    def save(self, step: int, *, epoch_end: bool = False, meta: dict | None = None) -> str | None:
        """Write a checkpoint if one is due at ``step``; returns its name (on every rank)."""
        if not self.due(step, epoch_end):
            return None
        state = self.state_fn()
        name = Entry(step, epoch_end, {}).name
        if not self.enabled:
            return name
        from safetensors.torch import save as st_save

        tensors: dict[str, torch.Tensor] = {}
        tree = encode_state(state, tensors)
        blob = st_save(tensors)
        head = dict(format=FORMAT, step=step, epoch_end=epoch_end, meta=meta or {},
                    sha256=hashlib.sha256(blob).hexdigest(), nbytes=len(blob), state=tree)
        self.run.write_bytes_atomic(blob, FOLDER, f"{name}.safetensors")
        self.run.write_bytes_atomic(json.dumps(head).encode(), FOLDER, f"{name}.json")  # the completion marker
        self._prune()
        return name

    def _names(self) -> dict[int, set[str]]:
        folder = self.run.path(FOLDER)
        try:
            self.run.fs.invalidate_cache(folder)
            listed = self.run.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return {}
        out: dict[int, set[str]] = {}
        for p in listed:
            m = _NAME.match(p.rsplit("/", 1)[-1])
            if m:
                out.setdefault(int(m.group(1)), set()).add(m.group(2))
        return out

    def _head(self, step: int) -> dict:
        name = Entry(step, False, {}).name
        try:
            head = json.loads(self.run.read_bytes(FOLDER, f"{name}.json"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{name}.json: not valid JSON ({first_line(e)})") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("step") != step:
            raise CheckpointError(f"{name}.json: not a format-{FORMAT} checkpoint of step {step}")
        return head

    def _rm(self, step: int, kinds: set[str]) -> None:
        for kind in sorted(kinds, key=lambda k: k != "json"):  # the marker first: a cut prune leaves no half
            try:
                self.run.fs.rm(self.run.path(FOLDER, f"{Entry(step, False, {}).name}.{kind}"))
            except FileNotFoundError:
                pass

    def _prune(self) -> None:
        """Keep every epoch end and the newest ``keep_latest_k`` step checkpoints; drop tensor
        files whose JSON never landed (a crash between the two writes)."""
        names = self._names()
        latest = max(names, default=-1)
        steps = []
        for step, kinds in sorted(names.items()):
            if "json" not in kinds:
                if step < latest:
                    self._rm(step, kinds)
                continue
            try:
                if not self._head(step)["epoch_end"]:
                    steps.append(step)
            except (CheckpointError, FileNotFoundError):
                continue  # left for load() to report
        for step in steps[: -self.keep_latest_k]:
            self._rm(step, names[step])

    def clear(self) -> int:
        """Remove every checkpoint and the best student (a run restarted with resume off); returns
        how many checkpoints there were."""
        names = self._names()
        for step, kinds in names.items():
            self._rm(step, kinds)
        for name in (BEST_INFO, BEST, BEST_OPEN_CLIP):
            if self.run.exists(FOLDER, name):
                self.run.fs.rm(self.run.path(FOLDER, name))
        return len(names)

    # ---- the best student ------------------------------------------------------------------
    def export_best(self, model: torch.nn.Module, info: dict) -> None:
        """Write ``model`` as the best student (where enabled), ``info`` last as ``best.json``."""
        if not self.enabled:
            return
        from safetensors.torch import save as st_save

        def blob(sd: dict) -> bytes:
            return st_save({k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()})

        self.run.write_bytes_atomic(blob(model.state_dict()), FOLDER, BEST)
        if getattr(model, "family", None) in ("siglip", "maskclip"):  # the wrapped open_clip model, in its own layout
            self.run.write_bytes_atomic(blob(model.model.state_dict()), FOLDER, BEST_OPEN_CLIP)
        self.run.write_bytes_atomic(json.dumps(info, indent=2).encode(), FOLDER, BEST_INFO)

    # ---- loading --------------------------------------------------------------------------
    def entries(self) -> list[int]:
        """Steps with a completion marker, oldest first."""
        return sorted(s for s, kinds in self._names().items() if "json" in kinds)

    def load(self, step: int) -> tuple[Entry, dict]:
        """One checkpoint, verified; CheckpointError names the file when it is damaged."""
        from safetensors.torch import load as st_load

        head = self._head(step)
        name = Entry(step, False, {}).name
        try:
            blob = self.run.read_bytes(FOLDER, f"{name}.safetensors")
        except FileNotFoundError:
            raise CheckpointError(f"{name}.safetensors: missing") from None
        if len(blob) != head["nbytes"] or hashlib.sha256(blob).hexdigest() != head["sha256"]:
            raise CheckpointError(f"{name}.safetensors: {len(blob)} bytes do not match the recorded size/sha256 "
                                  f"({head['nbytes']} bytes); the file is damaged")
        try:
            tensors = st_load(blob)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{name}.safetensors: unreadable ({first_line(e)})") from None
        return Entry(step, bool(head["epoch_end"]), head.get("meta") or {}), decode_state(head["state"], tensors)

    def load_latest(self) -> tuple[Entry, dict] | None:
        """The newest intact checkpoint; damaged ones are skipped with a warning. None when there
        is none at all; CheckpointError when there are some but none is intact."""
        steps = self.entries()
        problems = []
        for step in reversed(steps):
            try:
                return self.load(step)
            except (CheckpointError, FileNotFoundError) as e:
                where = f"{redact(self.run.url)}/{FOLDER}"
                log.warning("%s: checkpoint at step %d is damaged (%s); falling back to the previous one", where,
                            step, e)
                problems.append(str(e))
        if problems:
            raise CheckpointError(
                f"{redact(self.run.url)}/{FOLDER}: no intact checkpoint ({'; '.join(problems[:3])}); "
                "delete the damaged files or restart training with resume off (--no-resume)"
            )
        return None
