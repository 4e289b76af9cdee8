"""``python -m bench all [--quick]`` or ``python -m bench extract store ...``.

Benchmarks measure and print; they never pass or fail on time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).parent


def available() -> list[str]:
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="+", help=f"'all' or some of: {', '.join(available())}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes in all")
    args = parser.parse_args()
    names = available() if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available())}")
    results = {}
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        results[name] = importlib.import_module(f"bench.bench_{name}").main(quick=args.quick)
    (HERE / "results").mkdir(exist_ok=True)
    print(json.dumps(results, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
