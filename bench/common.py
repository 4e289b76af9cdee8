"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def save(name: str, data: dict) -> dict:
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return data
