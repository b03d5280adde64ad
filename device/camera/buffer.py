"""Bounded hand-off between pipeline stages with a named overflow policy and a drop counter."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")

# How often a blocked put()/get() re-checks the stop event: short enough for a prompt stop, long enough
# not to spin.
_POLL_S: Final = 0.05


class OverflowPolicy(StrEnum):
    """What put() does on a full queue."""

    DROP_OLDEST = "drop_oldest"  # live cameras: the kiosk wants the freshest frame
    WAIT = "wait"  # files: every frame matters, back-pressure the reader


class _End:
    """The end-of-stream sentinel's type (one instance, END)."""

    _instance: _End | None = None

    def __new__(cls) -> _End:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END"


END: Final = _End()


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame: its sequence number, capture time (monotonic s) and the read cost."""

    seq: int
    t_capture: float
    image: npt.NDArray[np.uint8]
    read_ms: float = 0.0


class BoundedQueue(Generic[T]):
    """A bounded FIFO whose overflow policy is explicit; the END sentinel always fits."""

    def __init__(self, capacity: int, policy: OverflowPolicy, name: str = "queue") -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.policy = policy
        self.name = name
        self._items: deque[T | _End] = deque()
        self._cond = threading.Condition()
        self.dropped = 0
        self.put_count = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T, stop: threading.Event | None = None) -> bool:
        """Enqueue per the policy; False when ``stop`` was set while waiting for room."""
        with self._cond:
            if self.policy is OverflowPolicy.DROP_OLDEST:
                while len(self._items) >= self.capacity:
                    self._items.popleft()
                    self.dropped += 1
            else:
                while len(self._items) >= self.capacity:
                    if stop is not None and stop.is_set():
                        return False
                    self._cond.wait(_POLL_S)
            self._items.append(item)
            self.put_count += 1
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """Append the END sentinel (never blocks, never dropped)."""
        with self._cond:
            self._items.append(END)
            self._cond.notify_all()

    def get(self, timeout_s: float | None = None) -> T | _End | None:
        """Next item, END, or None after ``timeout_s`` with nothing to take."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            item = self._items.popleft()
            self._cond.notify_all()
            return item
