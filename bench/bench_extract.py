"""Extract: model-forward share of stage time, and images/s with 1 and 2 worker processes.

Efficiency = time inside model forwards / worker wall time of the stage (goal ≥ 0.9). Two
figures: the whole stage (cluster start and model build included) and steady state (per-batch
worker time, which is what a long paper-scale run sees).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from bench.common import save


def _run(workers: int, n_tars: int, per_tar: int, size: tuple[int, int], recipe: str) -> dict:
    from spar_pipeline import augment, extract, ingest
    from spar_pipeline.run import Run
    from spar_pipeline.testing import make_sa1b_source

    with tempfile.TemporaryDirectory() as tmp:
        tars = make_sa1b_source(Path(tmp) / "src", n_tars=n_tars, per_tar=per_tar, size=size, seed=3)
        run = Run(str(Path(tmp) / "run"))
        run.resolve_recipe(recipe)
        ingest.run(run, [str(t) for t in tars])
        augment.run(run)
        rep = extract.run(run, workers=workers, progress=False)
    images = rep["done"] + rep["rejected"]
    return dict(
        workers=workers,
        images=images,
        windows=rep["windows"],
        wall_seconds=rep["seconds"],
        images_per_second=images / rep["seconds"],
        windows_per_second=rep["windows"] / rep["seconds"],
        forward_seconds=rep["forward_seconds"],
        task_seconds=rep["task_seconds"],
        stage_efficiency=rep["forward_seconds"] / (rep["seconds"] * workers),
        steady_efficiency=rep["forward_seconds"] / max(rep["task_seconds"], 1e-9),
    )


def main(quick: bool = False) -> dict:
    logging.getLogger("spar_pipeline").setLevel(logging.WARNING)
    per_tar = 6 if quick else 16
    rows = [_run(w, 2, per_tar, (240, 160), "tiny-cpu") for w in (1, 2)]
    for r in rows:
        print(f"tiny-siglip  workers={r['workers']}  {r['images']} images  {r['images_per_second']:.2f} img/s  "
              f"{r['windows_per_second']:.1f} win/s  efficiency stage={r['stage_efficiency']:.2f} "
              f"steady={r['steady_efficiency']:.2f}")
    scaling = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    print(f"2 workers / 1 worker images/s: {scaling:.2f}×")
    return save("extract", {"tiny": rows, "scaling_2_over_1": scaling})


if __name__ == "__main__":
    main()
