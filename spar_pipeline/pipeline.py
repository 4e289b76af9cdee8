"""``spar-pipeline run``: every stage in order, each resuming, then a short report.

With no SOURCE on a tiny recipe it generates its own SA-1B-layout tars, so the main job
runs anywhere with no download.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from spar_pipeline import manifest
from spar_pipeline.run import Run, RunError

__all__ = ["run_all", "embedded_source", "embedded_benchmark"]

log = logging.getLogger(__name__)

DEMO_TARS, DEMO_PER_TAR, DEMO_SIZE = 3, 12, (240, 160)
MINI_TARS, MINI_PER_TAR, MINI_BENCH = 4, 16, 24  # the miniature world's source and scenes benchmark


def _is_mini(run: Run) -> bool:
    return run.recipe.recipe.backbone == "mini-clip"


def embedded_benchmark(run: Run) -> dict[str, str]:
    """The mini recipe's own benchmark (scenes in an mmseg layout), written once under RUN/bench/
    (a local temporary folder for object-store runs): what ``run`` evaluates when given no dataset."""
    from spar_pipeline.mini.scenes import make_scene_benchmark

    root = Path(run.path("bench")) if run.local else Path(tempfile.gettempdir()) / f"spar-bench-{run.recipe.fingerprint}"
    if not (root / "scenes" / "annotations" / "val" / f"scene_{MINI_BENCH - 1:04d}.png").is_file():
        make_scene_benchmark(root, n=MINI_BENCH)
    return {"scenes": str(root / "scenes")}


def embedded_source(run: Run) -> list[str]:
    """Generated SA-1B-layout tars under RUN/source/ (uploaded there for object-store runs)."""
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    names = [f"sa_{i:06d}.tar" for i in range(MINI_TARS if _is_mini(run) else DEMO_TARS)]
    if all(run.exists("source", n) for n in names):
        return [run.url_for("source", n) for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        if _is_mini(run):  # the miniature world: scenes the mini model can name
            from spar_pipeline.mini.scenes import make_scene_source

            tars = make_scene_source(Path(tmp), n_tars=MINI_TARS, per_tar=MINI_PER_TAR, seed=run.recipe.recipe.seed)
        else:
            tars = make_sa1b_source(Path(tmp), n_tars=DEMO_TARS, per_tar=DEMO_PER_TAR, size=DEMO_SIZE,
                                    seed=run.recipe.recipe.seed)
        for t in tars:
            run.write_bytes_atomic(Path(t).read_bytes(), "source", Path(t).name)
    return [run.url_for("source", Path(t).name) for t in tars]


def run_all(
    run: Run,
    sources: list[str] | None = None,
    *,
    gpus: list[int] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    limit: int | None = None,
    epochs: int | None = None,
    datasets: dict[str, str] | None = None,
    links: str | None = None,
    tars: list[str] | None = None,
    max_id: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every stage in order, each resuming; ``datasets`` (name -> root) adds the evaluate stage.
    ``links``/``tars``/``max_id``/``limit`` are ingest's (``limit`` counts the whole run, not this call)."""
    from spar_pipeline import augment, extract, ingest, train
    from spar_pipeline.report import write_summary
    from spar_pipeline.showcase import held_out_look

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t
        log.info("%s finished in %.1f s", name, timings[name])
        return out

    if not sources and not links:
        if not run.recipe.name.startswith(("tiny", "mini")):
            raise RunError(f"recipe {run.recipe.name!r} needs SA-1B tars: give paths/globs/URLs or --links FILE "
                           "--tars NAMES; only the tiny and mini recipes generate their own source")
        sources = embedded_source(run)
    reports: dict[str, Any] = {}
    if limit is not None:  # a total for the run, so a rerun finishes the same selection instead of adding to it
        limit = max(0, int(limit) - manifest.read_manifest(run, "ingest").num_rows)
    if limit == 0:
        log.info("ingest: the run already holds the --limit of images; nothing to ingest")
    else:
        reports["ingest"] = timed("ingest", ingest.run, run, sources, links=links, tars=tars, max_id=max_id,
                                  limit=limit, storage_options=run.storage_options)
    reports["augment"] = timed("augment", augment.run, run)
    reports["extract"] = timed("extract", extract.run, run, gpus=gpus, workers=workers, scheduler=scheduler,
                               progress=progress)
    reports["train"] = timed("train", train.run, run, gpus=gpus, epochs=epochs, progress=progress)
    if not datasets and _is_mini(run) and "scenes" in run.recipe.evaluate.datasets:
        datasets = embedded_benchmark(run)
    if datasets:
        from spar_pipeline import evaluate

        def evaluate_all() -> list[dict]:
            rows = evaluate.run(run, datasets, checkpoints=["pretrained"], modes=("single", "sliding"))
            if run.exists(*evaluate.BEST):  # a student trained further in this call has new weights: redo
                retrained = bool(reports["train"].get("steps_this_run"))
                rows += evaluate.run(run, datasets, checkpoints=["best"], modes=("single", "sliding"), redo=retrained)
            return rows

        reports["evaluate"] = timed("evaluate", evaluate_all)
    from spar_pipeline.datasets import class_lines

    classes = class_lines("scenes") if _is_mini(run) else None  # name what the mini model knows in the overlay
    reports["look"] = timed("held-out look", held_out_look, run, classes=classes)
    reports["seconds"] = time.perf_counter() - t0
    reports["timings"] = timings
    reports["summary"] = write_summary(run, reports)
    return reports
