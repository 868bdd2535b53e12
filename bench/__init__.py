"""Benchmarks: `python -m bench` (or `make bench`) runs every `bench/*_bench.py` module's `main()` in turn.

Contract for a benchmark module: `main() -> list[dict]`, one dict per measured case with at least
``bench`` (the module's short name), ``case``, ``seconds`` and, where the case is compared with a baseline
measured in the same run, ``baseline``, ``baseline_seconds`` and ``ratio`` (seconds / baseline_seconds).
Extra keys become extra columns. Each module also runs alone: `python -m bench.<name>_bench`.
"""
