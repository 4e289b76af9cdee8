"""The student being distilled: its backbone, what may change, and one training step.

The backbone stays in eval mode for the whole of training, as in the reference (see
docs/reference.md): freezing is done by ``requires_grad`` alone, so no module changes behaviour
between the teacher maps (made in eval mode) and the student's forward. For DINOv3.txt this
matters: in train mode transformers' RoPE applies a random coordinate rescale each step.

One optimizer step is ``accumulate`` micro-steps (one image each) on every process; each
micro-step's MSE is divided by ``accumulate`` and DDP averages over the processes, so an
optimizer step follows the mean gradient of ``images_per_step = accumulate · world`` images,
whatever the split between processes and accumulation.

On a CPU the blocks before the first trainable one run once per image: their output is kept
(``prefixes.PrefixCache``) and each later epoch starts from it, the same tensors the full pass would make.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from spar_pipeline.devices import autocast, autocast_dtype
from spar_pipeline.errors import TrainError
from spar_pipeline.prefixes import BUDGET_BYTES, PrefixCache

__all__ = ["Student"]


class Student:
    """``model`` with ``trainable`` unfrozen, AdamW over those parameters, a grad scaler for fp16
    autocast, (``ddp``) a DistributedDataParallel wrapper for the forward, and on a CPU the frozen blocks'
    output per image, up to ``prefix_budget`` bytes (0: none kept)."""

    def __init__(self, model: torch.nn.Module, trainable: str, *, lr: float, weight_decay: float, precision: str,
                 device: torch.device, accumulate: int = 1, ddp: bool = False, prefix_budget: int = BUDGET_BYTES):
        if accumulate < 1:
            raise TrainError(f"accumulate={accumulate}: must be ≥ 1")
        self.model, self.device, self.accumulate = model.to(device).eval(), device, accumulate
        self.n_trainable = model.set_trainable(trainable)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=lr, weight_decay=weight_decay)
        self.amp = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.net: torch.nn.Module = model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Frozen parameters have requires_grad False, so DDP leaves them out of its buckets; but a spec
            # such as "all" also unfreezes parameters the dense path never uses (text tower, pool query), so
            # DDP must look for unused ones, as the reference's ddp_find_unused_parameters_true does.
            self.net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                           find_unused_parameters=True)
        self.micro = 0  # micro-steps since the last optimizer step
        self.depth = model.frozen_depth() if device.type == "cpu" and prefix_budget > 0 else 0
        self.prefixes = PrefixCache(prefix_budget)

    def autocast(self):
        return autocast(self.device, self.amp)

    def input(self, img: torch.Tensor, key=None):
        """uint8 [3, H, W] -> the normalised float batch [1, 3, H, W] on the device; with ``key`` (the image's
        id) and frozen leading blocks, their output instead (a ``Partial``: the model's forward finishes it)."""
        def normalised() -> torch.Tensor:
            x = img.to(self.device, non_blocking=True)[None].float().div_(255.0)
            return self.model.normalize(x)

        if key is None or not self.depth:
            return normalised()

        def frozen():
            with torch.no_grad(), self.autocast():
                return self.model.prefix(normalised(), self.depth)

        return self.prefixes.get(key, frozen)

    def train_step(self, img: torch.Tensor, teacher: torch.Tensor, key=None) -> tuple[torch.Tensor, bool]:
        """One image: forward, MSE against ``teacher`` [h, w, D], backward; the optimizer steps on
        the last micro-step of each ``accumulate``. Returns (the image's loss, whether it stepped). ``key``
        names the image for the frozen blocks' output (``input``)."""
        last = self.micro + 1 == self.accumulate
        x, target = self.input(img, key), teacher.to(self.device, non_blocking=True)[None].float()
        sync = self.net.no_sync() if not last and self.net is not self.model else contextlib.nullcontext()
        with sync:
            with self.autocast():
                out = self.net(x)
            if out.shape != target.shape:
                raise TrainError(f"student map {tuple(out.shape[1:])} != teacher map {tuple(target.shape[1:])}; "
                                 "the store was extracted with another backbone or augmentation")
            loss = F.mse_loss(out.float(), target)
            self.scaler.scale(loss / self.accumulate).backward()  # x / 1 is x exactly
        self.micro += 1
        if last:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.micro = 0
        return loss.detach(), last

    @torch.no_grad()
    def mse(self, img: torch.Tensor, teacher: torch.Tensor, key=None) -> torch.Tensor:
        """The single-pass MSE of one image against its teacher map, without a gradient (validation)."""
        with self.autocast():
            out = self.model(self.input(img, key))
        return F.mse_loss(out.float(), teacher.to(self.device)[None].float()).double()

    # ---- state: weights that change, the optimizer, the scaler -----------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.micro:  # checkpoints are taken between optimizer steps only
            raise TrainError(f"student state asked for {self.micro} micro-step(s) into an optimizer step (a bug)")
        return dict(model={n: p for n, p in self.params}, optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["model"]
        if set(weights) != {n for n, _ in self.params}:
            raise TrainError("the checkpoint's trainable weights do not match the model's trainable parameters")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(weights[n])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
