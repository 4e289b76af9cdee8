"""``spar-pipeline run``: every stage in order, each resuming, then the summary and the study report.

Over one run's images it extracts every teacher once (the recipe's ``[extract]``, teacher
``default``, and each ``[[teachers]]`` table) and trains every student (each ``[[students]]``
table, seeds expanded; without any, the one student ``default``), each resuming from its own
checkpoints; with benchmarks it evaluates pretrained (single and sliding: the paper's Table 1 baselines) and
every student in a single pass (the default one labelled ``best``; what Table 1 and the ablations compare:
``evaluate --checkpoint NAME --mode sliding`` adds a student's sliding rows); at each ``[evaluate] scales``
factor besides 1 (Fig. 3) pretrained single pass, sliding at ``scale_strides`` and the default
student's single pass. It ends with RUN/reports/summary.md and the study report (``study.write_report``:
RUN/reports/index.html, tables, figures).

With no SOURCE on a tiny or mini recipe it generates its own SA-1B-layout tars, and the mini
recipe its own benchmark (``mini.demo``), so the main job runs anywhere with no download.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from spar_pipeline import manifest
from spar_pipeline.recipe import StudentPlan
from spar_pipeline.run import DEFAULT, Run, RunError

__all__ = ["run_all"]

log = logging.getLogger(__name__)


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
    from spar_pipeline.mini import demo
    from spar_pipeline.report import held_out_look, write_summary
    from spar_pipeline.study import write_report

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t
        log.info("%s finished in %.1f s", name, timings[name])
        return out

    bench = None  # the mini recipe's own benchmark, written beside the first stages when none is given
    if not datasets and demo.is_mini(run) and "scenes" in run.recipe.evaluate.datasets:
        bench = demo.benchmark_started(run)
    if not sources and not links:
        if not demo.generates_source(run):
            raise RunError(f"recipe {run.recipe.name!r} needs SA-1B tars: give paths/globs/URLs or --links FILE "
                           "--tars NAMES; only the tiny and mini recipes generate their own source")
        sources = demo.embedded_source(run)
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
    for t in run.recipe.teachers:
        reports[f"extract {t.name}"] = timed(f"extract {t.name}", extract.run, run, teacher=t.name, settings=t.extract,
                                             gpus=gpus, workers=workers, scheduler=scheduler, progress=progress)
    trained: dict[str, dict] = {}
    for s in run.recipe.students or (StudentPlan(DEFAULT),):
        label = "train" if s.name == DEFAULT else f"train {s.name}"
        trained[s.name] = timed(label, train.run, run, gpus=gpus, epochs=epochs, progress=progress, student=s.name,
                                teacher=s.teacher, seed=s.seed, images=s.images, settings=s.train)
    reports["students"] = trained
    reports["train"] = trained.get(DEFAULT) or next(iter(trained.values()))
    if bench is not None:
        datasets = bench()
    if datasets:
        from spar_pipeline import evaluate

        # [evaluate] scales besides 1.0 (Fig. 3): pretrained single pass, sliding at scale_strides only and the
        # single pass of the default student and its other seeds (the figure's band), what the figure compares:
        # a sliding pass per scale is the costly part
        more = tuple(f for f in run.recipe.evaluate.scales if f != 1.0)
        scale_strides = run.recipe.evaluate.scale_strides
        plans = {s.name: s for s in run.recipe.students}
        swept = {DEFAULT} | {n for n, s in plans.items() if _seed_of_default(s, plans.get(DEFAULT))}

        def evaluate_all() -> list[dict]:
            from spar_pipeline.devices import worker_device
            from spar_pipeline.prefixes import PrefixCache
            from spar_pipeline.weights import pretrained_model

            # One pretrained model (and its class embeddings) for every call; on a CPU its single passes keep the
            # blocks the students freeze, for the students to finish.
            kept, (pre, _) = PrefixCache(), pretrained_model(None, run.recipe, worker_device())
            rows = evaluate.run(run, datasets, checkpoints=["pretrained"], modes=("single", "sliding"), prefixes=kept,
                                backbone=pre)
            if more:
                rows += evaluate.run(run, datasets, checkpoints=["pretrained"], scales=more, prefixes=kept,
                                     backbone=pre)
                if scale_strides:
                    rows += evaluate.run(run, datasets, checkpoints=["pretrained"], modes=("sliding",),
                                         strides=scale_strides, scales=more, backbone=pre)
            for name, report in trained.items():  # a student trained further in this call has new weights: redo
                if not run.fs.exists(run.student(name).best_weights):  # stopped before its first epoch
                    continue
                label, redo = "best" if name == DEFAULT else name, bool(report.get("steps_this_run"))
                rows += evaluate.run(run, datasets, checkpoints=[label], modes=("single",), redo=redo, prefixes=kept,
                                     backbone=pre)
                if more and name in swept:
                    rows += evaluate.run(run, datasets, checkpoints=[label], scales=more, redo=redo, prefixes=kept,
                                         backbone=pre)
            return rows

        reports["evaluate"] = timed("evaluate", evaluate_all)
    reports["look"] = timed("held-out look", held_out_look, run, classes=demo.overlay_classes(run))
    reports["seconds"] = time.perf_counter() - t0
    reports["timings"] = timings
    reports["summary"] = write_summary(run, reports)  # first, so that the study page links it
    reports["report"] = timed("report", write_report, run, datasets=datasets)
    reports["seconds"] = time.perf_counter() - t0
    reports["summary"] = write_summary(run, reports)  # again, with the report's time and page
    return reports


def _seed_of_default(plan: StudentPlan, default: StudentPlan | None) -> bool:
    """``plan`` is the default student at another seed (``[[students]] name = "default", seeds = [...]``)."""
    base = default or StudentPlan(DEFAULT)
    return (plan.teacher, plan.images, plan.train) == (base.teacher, base.images, base.train) and plan.seed is not None
