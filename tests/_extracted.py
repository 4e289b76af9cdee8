"""A run prepared up to extract, the teacher computed by hand, and the check that extract did each image once:
shared by the extract and store tests; and ``tiny_recipe``, the tiny-cpu recipe with a few keys changed, shared by
the train, study and torchrun tests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from spar_pipeline import augment, augmentation, ingest, manifest
from spar_pipeline.backbones import build
from spar_pipeline.mini.sa1b_writer import make_sa1b_source
from spar_pipeline.resources import stages_dir
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore
from spar_pipeline.windows import sliding_features


def tiny_recipe(path: Path, **changes: str) -> Path:
    """stages/tiny-cpu.toml written to ``path`` with each ``key = value`` line of ``changes`` replaced (values as
    TOML text: '"sorted"' for a string); a key not on exactly one line fails, so a renamed key is not missed."""
    text = (stages_dir() / "tiny-cpu.toml").read_text()
    for key, value in changes.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    path.write_text(text)
    return path


def prepare(url: str, src: Path, n_tars=2, per_tar=4, recipe="tiny-cpu") -> Run:
    """A run ingested and augmented from a fresh SA-1B-layout source: ready for extract."""
    tars = make_sa1b_source(src, n_tars=n_tars, per_tar=per_tar, seed=1)
    run = Run(url)
    run.resolve_recipe(recipe)
    ingest.run(run, [str(t) for t in tars])
    augment.run(run)
    return run


def teacher_by_hand(run: Run, image_id: int) -> np.ndarray:
    """The teacher's sliding-window map for one image, computed here outside the extract stage."""
    r = run.recipe
    b = build(r.recipe.backbone, checkpoint=r.recipe.checkpoint or None).eval()
    img = augmentation.augmented_image(run, image_id).float() / 255.0
    x = ((img - torch.tensor(b.mean).view(3, 1, 1)) / torch.tensor(b.std).view(3, 1, 1))[None]
    with torch.no_grad():
        return sliding_features(b, x, window=r.extract.window, stride=r.extract.stride).numpy()


def check_done_once(run: Run) -> list[dict]:
    """Every planned image has exactly one ok extract row whose map verifies in the store; the rows."""
    rows = manifest.read_manifest(run.teacher(), "extract").to_pylist()
    planned = manifest.read_manifest(run, "augment")["image_id"].to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(planned)
    store = FeatureStore.open(run.teacher().store_url, storage_options=run.storage_options)
    for r in rows:
        assert r["status"] == "ok", r
        assert store.verify(r["image_id"], (r["grid_h"], r["grid_w"], r["dim"]), r["checksum"]) is None
    return rows
