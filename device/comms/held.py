"""Events the outbox could not take (its disk is full): held in memory, in order, bounded, counted."""

from __future__ import annotations

from collections import deque

# Events held while the outbox cannot be written. A match event is ~0.3-1 KB of JSON, so the cap is
# ~3-10 MB of RAM: about 15 minutes of a busy kiosk (10 events/s), hours at ordinary store rates.
# Larger rides out longer disk-full episodes but costs RAM on a small kiosk; past it the oldest held
# event is dropped, counted in the health's ``outbox_dropped`` and alerted (``outbox_dropping``).
DEFAULT_MEMORY_CAP_EVENTS = 10_000


class HeldEvents:
    """A bounded FIFO of ``(topic, payload, qos)``; past ``cap`` the oldest is dropped and counted.

    Not thread-safe: the owner (``Comms``) serialises access with the lock that also orders outbox writes.
    """

    def __init__(self, cap: int = DEFAULT_MEMORY_CAP_EVENTS) -> None:
        if cap < 1:
            raise ValueError("memory cap must be >= 1")
        self.cap = cap
        self._rows: deque[tuple[str, bytes, int]] = deque()
        self.dropped = 0  # held events dropped because the cap was reached (lost for good)

    def hold(self, topic: str, payload: bytes, qos: int) -> bool:
        """Append one event; True when that dropped the oldest held one (the cap was reached)."""
        dropped = len(self._rows) >= self.cap
        if dropped:
            self._rows.popleft()
            self.dropped += 1
        self._rows.append((topic, bytes(payload), qos))
        return dropped

    def head(self, n: int) -> list[tuple[str, bytes, int]]:
        """The ``n`` oldest held events, oldest first (not removed)."""
        return [self._rows[i] for i in range(min(n, len(self._rows)))]

    def release(self, n: int) -> None:
        """Forget the ``n`` oldest events (written to the outbox)."""
        for _ in range(min(n, len(self._rows))):
            self._rows.popleft()

    def __len__(self) -> int:
        return len(self._rows)
