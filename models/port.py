"""The embedder port: what device and cloud code may rely on (the real Embedder and FakeEmbedder fit it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class EmbedderPort(Protocol):
    """Turns uint8 BGR HxWx3 crops into unit float32 vectors of a fixed dimension."""

    @property
    def dim(self) -> int:
        """Length of each embedding."""
        ...

    @property
    def model_id(self) -> str:
        """Fingerprint of the model; an index built with one model_id only serves queries of the same."""
        ...

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit rows, in the order of ``crops``."""
        ...
