"""A live progress line for stages: items and windows per second (or the stage's own text), ETA,
per-worker counts."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["StageProgress"]


class StageProgress:
    """``done`` items are counted as already finished (a resumed stage)."""

    def __init__(self, stage: str, total: int, enabled: bool = True, done: int = 0):
        self.stage, self.total, self.enabled, self.done = stage, total, enabled, done
        self.windows = 0
        self._t0 = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )

    def __enter__(self) -> "StageProgress":
        self._progress.start()
        self._task = self._progress.add_task(self.stage, total=self.total, completed=self.done, rate="")
        return self

    def update(self, n: int, windows: int = 0, workers: dict[str, int] | None = None, info: str | None = None) -> None:
        """``n`` more items done; ``info`` replaces the rates shown (the trainer's loss line)."""
        self.windows += windows
        dt = max(time.perf_counter() - self._t0, 1e-9)
        done = self._progress.tasks[0].completed + n - self.done
        rate = info if info is not None else f"{done / dt:.2f} img/s  {self.windows / dt:.1f} win/s"
        if workers:
            rate += "  " + " ".join(f"{w.split(':')[-1]}={c}" for w, c in sorted(workers.items()))
        self._progress.update(self._task, advance=n, rate=rate)

    def __exit__(self, *exc) -> None:
        self._progress.stop()
