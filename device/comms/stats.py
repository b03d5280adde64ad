"""Rolling per-stage latency percentiles for the health message (thread-safe)."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

DEFAULT_WINDOW = 1024  # samples per stage: ~1 min at 15 fps; larger smooths p99 but reacts slower


class LatencyStats:
    """Keeps the last ``window`` samples of each stage; ``percentiles()`` gives p50/p99 in ms."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, latency_ms: float) -> None:
        """Record one sample for ``stage``."""
        with self._lock:
            q = self._samples.get(stage)
            if q is None:
                q = self._samples[stage] = deque(maxlen=self._window)
            q.append(float(latency_ms))

    def add_many(self, latencies_ms: dict[str, float]) -> None:
        """Record one sample per stage (e.g. a match event's ``latency_ms``)."""
        for stage, value in latencies_ms.items():
            self.add(stage, value)

    def percentiles(self) -> dict[str, dict[str, float]]:
        """``{stage: {"p50": ms, "p99": ms, "n": count}}`` over the current window."""
        with self._lock:
            snapshot = {stage: np.fromiter(q, dtype=np.float64) for stage, q in self._samples.items() if q}
        out: dict[str, dict[str, float]] = {}
        for stage, arr in snapshot.items():
            p50, p99 = np.percentile(arr, [50.0, 99.0])
            out[stage] = {"p50": round(float(p50), 3), "p99": round(float(p99), 3), "n": float(arr.size)}
        return out

    def reset(self) -> None:
        """Forget every sample."""
        with self._lock:
            self._samples.clear()
