"""Benchmarks for scoutfs-notify: ``python -m bench`` writes BENCHMARKS.md."""
