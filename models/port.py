"""The embedder port: the one interface device and cloud code rely on (Embedder and FakeEmbedder fit it).

Three members, as the house style asks. Faster paths an adapter may offer are looked up, never required:
``embed_one(crop)`` (thread-safe single crop), ``submit(crop, callback, userdata)`` (asynchronous, the
kiosk pipeline), ``close()`` (release the runtime), ``num_requests`` (parallel requests it serves).
"""

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


def embed_one(embedder: EmbedderPort, crop: np.ndarray) -> np.ndarray:
    """One crop's vector: the adapter's own ``embed_one`` when it has one (no batch), else ``embed``."""
    one = getattr(embedder, "embed_one", None)
    return np.asarray(one(crop) if callable(one) else embedder.embed([crop])[0], dtype=np.float32)


def close(embedder: EmbedderPort) -> None:
    """Release the adapter's runtime, when it holds one."""
    fn = getattr(embedder, "close", None)
    if callable(fn):
        fn()
