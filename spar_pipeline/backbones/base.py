"""What every backbone offers: dense features, text features, freezing, weights identity."""

from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from spar_pipeline.errors import BackboneError

__all__ = ["Backbone", "BackboneError", "Partial", "parse_trainable"]

log = logging.getLogger(__name__)

TRAINABLE_OPTIONS = ("all", "blk_i", "mlp_i", "qkv_i", "posembed", "patchembed")


def parse_trainable(spec: str) -> list[tuple[str, int | None]]:
    """'blk_-1, blk_-2' -> [('blk', -1), ('blk', -2)]; errors name the bad token and the options."""
    out: list[tuple[str, int | None]] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in ("all", "posembed", "patchembed"):
            out.append((token, None))
            continue
        prefix, _, index = token.rpartition("_")
        if prefix not in ("blk", "mlp", "qkv"):
            raise BackboneError(f"trainable option {token!r}: unknown; use {', '.join(TRAINABLE_OPTIONS)} (i may be negative)")
        try:
            out.append((prefix, int(index)))
        except ValueError:
            raise BackboneError(f"trainable option {token!r}: the block index must be an integer, e.g. {prefix}_-1") from None
    if not out:
        raise BackboneError(f"trainable spec {spec!r} names nothing; use e.g. blk_-1,blk_-2")
    return out


class Partial(NamedTuple):
    """A single pass stopped after its first ``depth`` blocks: what ``Backbone.finish`` needs to end it.
    Models that share those blocks (a student and its pretrained model) can finish the same one."""

    tokens: torch.Tensor
    depth: int
    grid: tuple[int, int, int]  # (batch, grid height, grid width) of the dense map


class Backbone(nn.Module):
    """A frozen-or-partly-trainable ViT with SPAR's dense head. ``forward(x) == dense(x)``."""

    family = "base"
    qkv_keys: tuple[str, ...] = ("qkv",)

    def __init__(self, name: str, model: nn.Module, window: int, mean: Sequence[float], std: Sequence[float],
                 patch_size: int, dim: int):
        super().__init__()
        self.name = name
        self.model = model
        self.window = int(window)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.patch_size = int(patch_size)
        self.dim = int(dim)
        self._stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # normalize's mean/std per device

    # ---- to implement per family ----------------------------------------------------------
    def dense(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    def posembed_params(self) -> list[nn.Parameter]:
        return []

    def patchembed_params(self) -> list[nn.Parameter]:
        return []

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint in a family's original layout, renamed to this module's keys (identity here)."""
        return state

    def encode_text(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def text_params(self) -> list[nn.Parameter]:
        """The parameters outside the image tower (the text tower, the logit scale; a student trains them only with
        "all"). None here, where the family loads its text tower apart (dino.txt)."""
        return []

    # The single pass in parts, for families whose dense path runs its blocks one after another unchanged
    # (``dense(x) == finish(prefix(x, d))`` for 0 ≤ d ≤ split_limit()); the others keep 0 and are never split.
    def split_limit(self) -> int:
        """How many leading blocks a single pass can stop after (0: this family's pass is not split)."""
        return 0

    def embed_params(self) -> list[nn.Parameter]:
        """The parameters the pass uses before its first block (patch and position embeddings, ...)."""
        return []

    def prefix(self, x: torch.Tensor, depth: int) -> Partial:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name}: the {self.family} single pass is not split")

    def finish(self, p: Partial) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name}: the {self.family} single pass is not split")

    def prefix_params(self, depth: int) -> list[nn.Parameter]:
        """Every parameter ``prefix(x, depth)`` reads."""
        return self.embed_params() + [p for blk in list(self.blocks())[:depth] for p in blk.parameters()]

    def frozen_depth(self) -> int:
        """The deepest split whose parameters are all frozen: what training never changes, so a single pass
        up to it is the same every epoch (``student``'s prefix cache)."""
        depth = 0
        while depth < self.split_limit() and not any(p.requires_grad for p in self.prefix_params(depth + 1)):
            depth += 1
        return depth

    def depth_frozen_by(self, spec: str) -> int:
        """``frozen_depth`` of this model trained with ``spec``; its own trainable flags are left as they were."""
        flags = [p.requires_grad for p in self.parameters()]
        try:
            self.set_trainable(spec)
            return self.frozen_depth()
        finally:
            for p, f in zip(self.parameters(), flags):
                p.requires_grad_(f)

    def prefix_digest(self, depth: int) -> str:
        """Identity of ``prefix(·, depth)``: the family, the depth and sha256 over its parameters' bytes."""
        h = hashlib.sha256(f"{type(self).__name__}|{depth}|".encode())
        for p in self.prefix_params(depth):
            v = p.detach().to("cpu").contiguous()
            h.update(f"{v.dtype}|{tuple(v.shape)}|".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- shared ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | Partial) -> torch.Tensor:
        """The dense map of an image batch, or the end of a ``Partial`` pass."""
        return self.finish(x) if isinstance(x, Partial) else self.dense(x)

    def normalize(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The input every dense path takes: ``(x − scale·mean) / (scale·std)`` per channel of a float
        [B, 3, H, W] (or [3, H, W]) image in [0, scale]. ``scale`` 1 is the reference's ToTensor → Normalize
        (teacher and student); 255 its evaluation preprocessor's order on raw 0–255 values."""
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"{self.name}: normalize takes [B, 3, H, W] or [3, H, W], got {list(x.shape)}")
        key = (x.device, float(scale))
        if key not in self._stats:  # made once per device: no host-to-device copy per image
            mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
            self._stats[key] = (mean * scale, std * scale) if scale != 1.0 else (mean, std)
        mean, std = self._stats[key]
        return (x - mean) / std

    @torch.no_grad()
    def class_embeddings(self, class_lines: Sequence[str], templates: Sequence[str],
                         batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query (a class line split on ', '): 80 prompts, L2-normalised each, mean, normalised.

        Returns (embeddings [Q, D], class_index [Q]) mapping each query to its class line.
        """
        queries, index = [], []
        for c, line in enumerate(class_lines):
            for synonym in line.replace("\n", "").split(", "):
                queries.append(synonym)
                index.append(c)
        out = []
        for q in queries:
            prompts = [t.format(q) for t in templates]
            feats = torch.cat([self.encode_text(prompts[i:i + batch]) for i in range(0, len(prompts), batch)])
            out.append(F.normalize(F.normalize(feats.float(), dim=-1).mean(0), dim=-1))
        return torch.stack(out), torch.tensor(index, dtype=torch.long)

    def set_trainable(self, spec: str) -> int:
        """Freeze everything, then unfreeze what ``spec`` names; returns the trainable count."""
        options = parse_trainable(spec)
        for p in self.parameters():
            p.requires_grad_(False)
        blocks = self.blocks()
        for kind, i in options:
            if kind == "all":
                params = list(self.parameters())
            elif kind == "posembed":
                params = self.posembed_params()
            elif kind == "patchembed":
                params = self.patchembed_params()
            else:
                if not -len(blocks) <= i < len(blocks):
                    raise BackboneError(f"trainable option {kind}_{i}: {self.name} has {len(blocks)} blocks")
                named = list(blocks[i].named_parameters())
                if kind == "blk":
                    params = [p for _, p in named]
                elif kind == "mlp":
                    params = [p for n, p in named if "mlp" in n]
                else:
                    params = [p for n, p in named if any(k in n for k in self.qkv_keys)]
            if not params:
                label = kind if i is None else f"{kind}_{i}"
                raise BackboneError(f"trainable option {label!r} matches no parameter of {self.name}"
                                 + (" (it has no learned position embedding)" if kind == "posembed" else ""))
            for p in params:
                p.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def weights_digest(self) -> str:
        """Identity of the current weights (the teacher fingerprint uses it): sha256 over every
        state-dict key and tensor bytes, first 16 hex. Computed on each call, so it follows training."""
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            v = v.detach().to("cpu").contiguous()
            h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
            if v.numel():
                h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.dtype != torch.bool
                         else v.numpy().tobytes())
        return h.hexdigest()[:16]
