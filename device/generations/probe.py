"""The probation probe: is the generation that just started serving healthy on the live pipeline?"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from typing import Final

from device.pipeline import Counters

_PROBE_WINDOW: Final = 64  # recent per-item embed latencies kept: enough for a stable median
_PROBE_MIN_SAMPLES: Final = 5  # fewer items since the switch: no latency verdict yet (an idle kiosk is fine)


class SwitchProbe:
    """The probation health check: pipeline errors grew since the switch, or the live embed p50 of the new
    model exceeds ``factor`` x the p50 of the model before it (+ ``slack_ms``)."""

    def __init__(self, counters: Counters, *, factor: float, slack_ms: float) -> None:
        self._counters = counters
        self._factor = factor
        self._slack_ms = slack_ms
        self._lock = threading.Lock()
        self._recent: deque[tuple[str, float]] = deque(maxlen=_PROBE_WINDOW)
        self._model: str | None = None
        self._baseline_ms: float | None = None
        self._errors_at_switch = 0

    def on_result(self, model_id: str, embed_ms: float) -> None:
        """Record one answered item's embed latency (search-stage thread)."""
        with self._lock:
            self._recent.append((model_id, embed_ms))

    def on_switch(self, old_model: str, new_model: str) -> None:
        """Take the baseline of the outgoing model and the error count at the switch."""
        with self._lock:
            old = [ms for m, ms in self._recent if m == old_model]
            self._baseline_ms = statistics.median(old) if len(old) >= _PROBE_MIN_SAMPLES else None
            self._model = new_model
            self._errors_at_switch = self._counters.embed_errors

    def __call__(self) -> str | None:
        """None while healthy; else why the new pair should be rolled back."""
        grown = self._counters.embed_errors - self._errors_at_switch
        if grown > 0:
            return f"{grown} embedding error(s) since the switch"
        with self._lock:
            new = [ms for m, ms in self._recent if m == self._model]
            base = self._baseline_ms
        if base is None or len(new) < _PROBE_MIN_SAMPLES:
            return None
        p50 = statistics.median(new)
        if p50 > base * self._factor + self._slack_ms:
            return f"embed p50 {p50:.1f} ms vs {base:.1f} ms before the switch"
        return None
