"""Speed measurements (not DVC stages): ``python -m benchmarks.speed``."""
