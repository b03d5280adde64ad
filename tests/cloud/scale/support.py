"""What the Ray tests send to workers (importable there: picklable factories of fake embedders)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud.scale.embed import EmbeddingSpace
from tests.cloud.conftest import CountingEmbedder

KILL_WAIT_S = 120.0  # a worker waiting to be killed gives up (and fails its batch) after this


class _KillableEmbedder(CountingEmbedder):
    """On its ``kill_at``-th photo, the first such embedder anywhere (an O_EXCL marker file decides)
    writes its pid into ``fifo`` and waits there to be killed by the test."""

    def __init__(self, dim: int, seed: int, kill_at: int, marker: str, fifo: str) -> None:
        super().__init__(dim=dim, seed=seed)
        self._kill_at, self._marker, self._fifo = kill_at, marker, fifo

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if self.calls + len(crops) >= self._kill_at and self._claim():
            with open(self._fifo, "w") as f:  # blocks until the test opens it for reading: an event
                f.write(str(os.getpid()))
            threading.Event().wait(KILL_WAIT_S)
            raise RuntimeError("the test did not kill this worker")
        return super().embed(crops)

    def _claim(self) -> bool:
        try:
            os.close(os.open(self._marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class FakeEmbedders:
    """The tests' EmbedderFactory: CountingEmbedder (a FakeEmbedder) in every actor."""

    dim: int = 32
    seed: int = 0
    kill_at: int = 0  # > 0: one worker waits to be killed at that photo (see _KillableEmbedder)
    marker: str = ""
    fifo: str = ""

    def __call__(self, threads: int) -> CountingEmbedder:
        if self.kill_at:
            return _KillableEmbedder(self.dim, self.seed, self.kill_at, self.marker, self.fifo)
        return CountingEmbedder(dim=self.dim, seed=self.seed)

    def space(self) -> EmbeddingSpace:
        e = CountingEmbedder(dim=self.dim, seed=self.seed)
        return EmbeddingSpace(e.dim, e.model_id, e.preprocessing_hash)
