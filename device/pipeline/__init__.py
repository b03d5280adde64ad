"""The kiosk's frame pipeline: detect -> embed (async) -> search -> one answer per held item."""

from __future__ import annotations

from device.pipeline.aggregate import ItemResult, aggregate
from device.pipeline.runner import Pipeline, limit_blas_threads
from device.pipeline.stages import (
    AsyncEmbedderPort,
    Counters,
    InlineSubmit,
    ModelPair,
    PairProvider,
    as_async,
)

__all__ = [
    "AsyncEmbedderPort",
    "Counters",
    "InlineSubmit",
    "ItemResult",
    "ModelPair",
    "PairProvider",
    "Pipeline",
    "aggregate",
    "as_async",
    "limit_blas_threads",
]
