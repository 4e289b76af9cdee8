"""What ``spar-pipeline run`` borrows from the miniature world when it is given nothing to read.

With no SOURCE, a tiny or mini recipe generates its own SA-1B-layout tars (generic images for
tiny recipes, scenes the mini model can name for the mini recipe); with no dataset, the mini
recipe evaluates on its own generated ``scenes`` benchmark. So the whole job runs anywhere with
no download.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from spar_pipeline.run import Run

__all__ = ["generates_source", "is_mini", "embedded_source", "embedded_benchmark", "benchmark_started",
           "overlay_classes"]

DEMO_TARS, DEMO_PER_TAR, DEMO_SIZE = 3, 12, (240, 160)
MINI_TARS, MINI_PER_TAR, MINI_BENCH = 4, 16, 96  # the miniature world's source and scenes benchmark


def is_mini(run: Run) -> bool:
    """The run is the miniature world's: its model is mini-clip (with a position table or rotary positions)."""
    return run.recipe.recipe.backbone in ("mini-clip", "mini-clip-rope")


def generates_source(run: Run) -> bool:
    """Only the tiny and mini recipes make up their own source when given none."""
    return run.recipe.name.startswith(("tiny", "mini"))


def embedded_benchmark(run: Run) -> dict[str, str]:
    """The mini recipe's own benchmark (scenes in an mmseg layout), written once under RUN/bench/
    (a local temporary folder for object-store runs): what ``run`` evaluates when given no dataset."""
    return benchmark_started(run, background=False)()


def benchmark_started(run: Run, background: bool = True) -> Callable[[], dict[str, str]]:
    """Start writing ``embedded_benchmark``'s scenes (unless written already) and return the wait for them.
    ``background``: in another process, ~5 s of one core beside the single-threaded starts of the stages."""
    from spar_pipeline.mini.scenes import make_scene_benchmark

    root = Path(run.path("bench")) if run.local else Path(tempfile.gettempdir()) / f"spar-bench-{run.recipe.fingerprint}"
    answer = {"scenes": str(root / "scenes")}
    if (root / "scenes" / "annotations" / "val" / f"scene_{MINI_BENCH - 1:04d}.png").is_file():
        return lambda: answer
    if not background:
        make_scene_benchmark(root, n=MINI_BENCH)
        return lambda: answer
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    job = pool.submit(make_scene_benchmark, root, n=MINI_BENCH)
    pool.shutdown(wait=False)  # the process ends after its one job

    def wait() -> dict[str, str]:
        job.result()  # its error, if any, is raised here
        return answer

    return wait


def embedded_source(run: Run) -> list[str]:
    """Generated SA-1B-layout tars under RUN/source/ (uploaded there for object-store runs)."""
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    names = [f"sa_{i:06d}.tar" for i in range(MINI_TARS if is_mini(run) else DEMO_TARS)]
    if all(run.exists("source", n) for n in names):
        return [run.url_for("source", n) for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        if is_mini(run):  # the miniature world: scenes the mini model can name
            from spar_pipeline.mini.scenes import make_scene_source

            tars = make_scene_source(Path(tmp), n_tars=MINI_TARS, per_tar=MINI_PER_TAR, seed=run.recipe.recipe.seed)
        else:
            tars = make_sa1b_source(Path(tmp), n_tars=DEMO_TARS, per_tar=DEMO_PER_TAR, size=DEMO_SIZE,
                                    seed=run.recipe.recipe.seed)
        for t in tars:
            run.write_bytes_atomic(Path(t).read_bytes(), "source", Path(t).name)
    return [run.url_for("source", Path(t).name) for t in tars]


def overlay_classes(run: Run) -> list[str] | None:
    """Class lines for the held-out overlay: what the mini model knows; None (the demo's) otherwise."""
    from spar_pipeline.datasets import class_lines

    return class_lines("scenes") if is_mini(run) else None
