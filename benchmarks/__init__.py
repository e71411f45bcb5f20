"""Benchmarks: `python -m benchmarks.<name>`; results are written beside them."""
