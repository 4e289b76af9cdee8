"""What the trainer reads: (augmented image, teacher map) pairs, in the order it asks for.

Each pair is rebuilt from its manifest rows (the augmented image is decoded and transformed again,
never stored) and its teacher map is read from the store, in DataLoader worker processes that open
the store lazily and never re-read a manifest.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from spar_pipeline.errors import TrainError
from spar_pipeline.split import Item

__all__ = ["PairDataset", "PairLoader"]


class PairDataset(torch.utils.data.Dataset):
    """(image id, augmented uint8 image [3,H,W], teacher map float16 [h,w,D]) for each item."""

    def __init__(self, items: list[Item], store_url: str, storage_options: dict, max_pixels: int):
        self.items, self.store_url, self.max_pixels = items, store_url, max_pixels
        self.storage_options = storage_options
        self._store, self._pid = None, None

    def __len__(self) -> int:
        return len(self.items)

    def _open(self):
        if self._store is None or self._pid != os.getpid():
            from spar_pipeline.store import FeatureStore

            self._store, self._pid = FeatureStore.open(self.store_url, self.storage_options), os.getpid()
        return self._store

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        from spar_pipeline.augmentation import augmented_from_rows

        it = self.items[i]
        img = augmented_from_rows(it.ingest_row, it.augment_row, self.max_pixels, self.storage_options)
        teacher = self._open().read(it.image_id)
        if teacher.shape != it.grid:
            raise TrainError(f"image {it.image_id}: teacher map {teacher.shape} != {it.grid} in the extract manifest; "
                             "run `spar-pipeline verify --repair`")
        return it.image_id, img, torch.from_numpy(teacher)


class _Indices(torch.utils.data.Sampler):
    """A sampler whose index list is set before each pass (epoch order, resumed position)."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


class PairLoader:
    """A DataLoader over ``items`` (``workers`` processes, 4 pairs ahead each) whose order is set per pass."""

    def __init__(self, items: list[Item], store_url: str, storage_options: dict, max_pixels: int, *,
                 workers: int, pin_memory: bool = False):
        self.items = items
        self._index = {it.image_id: i for i, it in enumerate(items)}
        self._sampler = _Indices()
        self._loader = torch.utils.data.DataLoader(
            PairDataset(items, store_url, storage_options, max_pixels), batch_size=None, sampler=self._sampler,
            num_workers=workers, pin_memory=pin_memory,
            prefetch_factor=4 if workers > 0 else None,  # workers live for one pass, so none outlives training
        )

    def __len__(self) -> int:
        return len(self.items)

    def read(self, image_ids: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """One pass over ``image_ids``, in that order (starts the worker processes, if any)."""
        self._sampler.indices = [self._index[i] for i in image_ids]
        return iter(self._loader)
