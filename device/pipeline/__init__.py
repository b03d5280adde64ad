"""The kiosk's frame pipeline: detect -> embed (async) -> search -> one answer per held item."""

from __future__ import annotations

from device.pipeline.aggregate import ItemResult, aggregate
from device.pipeline.runner import Pipeline, limit_blas_threads
from device.pipeline.stages import (
    Counters,
    ModelPair,
    PairProvider,
    submit,
)

__all__ = [
    "Counters",
    "ItemResult",
    "ModelPair",
    "PairProvider",
    "Pipeline",
    "aggregate",
    "limit_blas_threads",
    "submit",
]
