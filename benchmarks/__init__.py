"""Benchmark scripts, run from the repository root as ``python -m benchmarks.<name>``.

Each prints its figures and appends rows (device, versions, git sha, date) to a CSV in
benchmarks/results/; BENCHMARKS.md summarises the latest of them.
"""
