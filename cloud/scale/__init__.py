"""Catalog builds past one machine, on Ray: embedding on an actor pool, per-store snapshots as tasks.

``cloud.scale.engine`` is the entry point (``storelens catalog build --engine ray``); the embedding cache
workers share is ``cloud.scale.parquet_cache``; ``ray`` itself is imported only inside functions, so the
rest of ``cloud`` works without the ``scale`` extra.
"""
