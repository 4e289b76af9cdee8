"""The data split of training: which images, which are held out, in which order on which process.

Pure functions of (seed, image ids, epoch), so every process, every resume and ``evaluate``'s
held-out MSE agree without talking to each other:

- ``split_holdout``: an image is held out when a hash of (seed, id) falls below
  ``[train].holdout_fraction``, so adding images never moves an old one across the split;
- ``epoch_order``: ``[train].order`` "shuffle" (a seeded permutation per epoch) or "sorted" (the
  same every epoch, as the reference; see docs/reference.md);
- ``nested_subset``: ``train --images N`` takes the first N of the training split in a seeded order
  of the ids (the recipe's seed, not the student's), the same for every student of a run, so
  smaller subsets lie inside larger ones (the paper's 1.25k ⊂ 2.5k ⊂ 12.5k); the held-out slice
  does not depend on N, so every student of a run validates on the same images;
- ``rank_share``: process ``r`` of ``world`` takes ``order[m·world + r]`` at its micro-step ``m``,
  so optimizer step ``k`` trains ``order[k·E:(k+1)·E]`` (E = ``images_per_step``) for every
  ``world`` that divides E.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from spar_pipeline import manifest
from spar_pipeline.errors import TrainError
from spar_pipeline.run import Run

__all__ = ["Item", "training_items", "split_holdout", "nested_subset", "epoch_order", "rank_share", "ORDERS"]

ORDERS = ("shuffle", "sorted")


def _unit(seed: int, image_id: int, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_holdout(ids: list[int], seed: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out): an image is held out when its hash of (seed, id) falls below
    ``fraction``, so membership does not depend on the other images; at least one of each, except
    that ``fraction`` 0 holds nothing out (the reference's training set)."""
    ids = sorted(ids)
    if fraction == 0:
        return ids, []
    if len(ids) < 2:
        raise TrainError(f"{len(ids)} image(s) ready: training needs at least 2 (one is held out for validation)")
    u = {i: _unit(seed, i, "holdout") for i in ids}
    val = {i for i in ids if u[i] < fraction} or {min(ids, key=u.__getitem__)}
    if len(val) == len(ids):
        val.discard(max(ids, key=u.__getitem__))
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def nested_subset(ids: list[int], n: int | None, seed: int) -> list[int]:
    """The first ``n`` of ``ids`` ordered by a hash of (seed, id), returned sorted; None: all of them.
    A hash per id, so the order of two images never depends on the others."""
    ids = sorted(ids)
    if n is None or n == len(ids):
        return ids
    if n > len(ids):
        raise TrainError(f"--images {n}: the training split holds {len(ids)} images (the held-out slice left "
                         f"out); use at most {len(ids)}")
    return sorted(sorted(ids, key=lambda i: _unit(seed, i, "subset"))[:n])


def epoch_order(ids: list[int], seed: int, epoch: int, order: str = "shuffle") -> list[int]:
    """The epoch's order, a pure function of (seed, epoch, the id set): a fresh permutation each
    epoch ("shuffle"), or the ids sorted, the same every epoch ("sorted", the reference's)."""
    ids = sorted(ids)
    if order == "sorted":
        return ids
    if order != "shuffle":
        raise TrainError(f"[train].order={order!r}: must be one of {', '.join(ORDERS)}")
    rng = np.random.default_rng([seed, epoch, 0x7472])
    return [ids[i] for i in rng.permutation(len(ids))]


def rank_share(order: list[int], rank: int, world: int, images_per_step: int | None = None) -> list[int]:
    """Rank ``rank``'s images: ``order[m·world + rank]`` for each of its micro-steps ``m``, so
    optimizer step ``k`` trains ``order[k·E:(k+1)·E]`` (E = ``images_per_step``, default ``world``)
    whatever ``world`` divides E; the tail that does not fill an optimizer step is left out this
    epoch (the next epoch shuffles anew)."""
    per_step = images_per_step or world
    return [order[m * world + rank] for m in range(len(order) // per_step * per_step // world)]


@dataclass(frozen=True)
class Item:
    """One training image: its rows (to rebuild the augmented image) and its teacher map's shape."""

    image_id: int
    ingest_row: dict
    augment_row: dict
    grid: tuple[int, int, int]  # teacher map shape (h, w, D) from the extract manifest


def training_items(run: Run, teacher: str = "default", images: int | None = None) -> tuple[list[Item], list[Item]]:
    """(train items, held-out items): the images ok in ingest, augment and teacher ``teacher``'s
    extract, split by ``[train].holdout_fraction``, the training part cut to ``images``
    (``nested_subset``); what ``train`` trains on and validates with, and the slice the held-out MSE
    of ``evaluate`` reads."""
    recipe = run.recipe
    ingest = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
    augment = {r["image_id"]: r for r in manifest.read_manifest(run, "augment").to_pylist() if r["status"] == "ok"}
    folder = run.teacher(teacher)
    extract = {r["image_id"]: r for r in manifest.read_manifest(folder, "extract").to_pylist() if r["status"] == "ok"}
    ids = sorted(set(augment) & set(extract) & set(ingest))
    need = 1 if recipe.train.holdout_fraction == 0 else 2
    if len(ids) < need:
        raise TrainError(f"{run!r}: {len(ids)} image(s) are done in both augment and extract; "
                         f"run `spar-pipeline extract{'' if teacher == 'default' else ' --teacher ' + teacher}` "
                         f"first (training needs at least {need})")
    train_ids, val_ids = split_holdout(ids, recipe.recipe.seed, recipe.train.holdout_fraction)
    train_ids = nested_subset(train_ids, images, recipe.recipe.seed)

    def item(i: int) -> Item:
        e = extract[i]
        return Item(i, ingest[i], augment[i], (e["grid_h"], e["grid_w"], e["dim"]))

    return [item(i) for i in train_ids], [item(i) for i in val_ids]
