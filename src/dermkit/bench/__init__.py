"""Benchmarks: figures in BENCHMARKS.md come from these commands."""
