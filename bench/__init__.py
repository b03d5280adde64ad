"""Benchmarks: each module has run(out_dir) -> dict; `python -m bench [names]` runs them side by side."""
