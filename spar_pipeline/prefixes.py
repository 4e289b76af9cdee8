"""Single passes kept after their first blocks, for work that would compute the same blocks again.

Why: on a CPU the frozen blocks are most of what a student costs. Training reads the same augmented image
every epoch through blocks that never change (``Backbone.frozen_depth``), and a study evaluates its students
and their pretrained model over the same images, where a student's frozen blocks are the pretrained ones.
Each ``Partial`` is kept once, under a byte budget (the first ones made; nothing is evicted), and finished by
every model that shares it: the same tensors, so the same maps to the bit. A GPU recomputes the blocks faster
than it would hold them at the paper's sizes, so the stages use this on a CPU only (bench/NOTES.md, "Frozen
blocks once").
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Hashable

if TYPE_CHECKING:
    from spar_pipeline.backbones.base import Partial

__all__ = ["PrefixCache", "BUDGET_BYTES"]

BUDGET_BYTES = 1 << 30  # 1 GiB of host memory: the mini study's 96 benchmark images at four scales take 0.2 GiB


class PrefixCache:
    """``Partial`` passes by key, up to ``budget`` bytes of tokens; safe to share between threads."""

    def __init__(self, budget: int = BUDGET_BYTES):
        self.budget, self.used, self.hits, self.misses = int(budget), 0, 0, 0
        self._items: dict[Hashable, Partial] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Partial]) -> Partial:
        """The pass kept under ``key``, or ``make()``'s, kept when it fits the budget."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self.hits += 1
                return hit
            self.misses += 1
        made = make()
        size = made.tokens.numel() * made.tokens.element_size()
        with self._lock:
            if key not in self._items and self.used + size <= self.budget:
                self._items[key] = made
                self.used += size
        return made

    def __len__(self) -> int:
        return len(self._items)
