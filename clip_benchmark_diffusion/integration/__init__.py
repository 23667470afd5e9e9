"""The one place that touches clip_benchmark's internals (see clip_benchmark.py)."""
