"""Benchmarks: each bench_*.py has ``main(quick: bool) -> dict``, prints figures, writes results/*.json."""
