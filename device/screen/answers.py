"""The customer's answer to "Is this it?": which results were asked about, and one answer per result.

The screen offers each shown result (its MatchEvent id and the skus on screen); the page posts a tap
(``confirmed`` + sku, or ``not_here``); a result not answered within the timeout, or replaced on screen by
the next one, is ``no_answer``. Every offered result is resolved exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

AnswerKind = Literal["confirmed", "not_here", "no_answer"]
TAPS: Final = ("confirmed", "not_here")  # what the page may post; no_answer is the kiosk's own verdict
_RECENT: Final = 64  # resolved match ids remembered, so a late or repeated tap is "already answered"


class AnswerRefused(ValueError):
    """A posted answer the screen does not take; ``status`` is the HTTP code, the message names why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Answer:
    """One resolved result: what was shown, what the customer chose (if anything) and how long it took."""

    match_id: str
    answer: AnswerKind
    sku: str | None
    shown: tuple[str, ...]  # skus in screen order, top first
    answered_after_s: float


@dataclass(slots=True)
class _Open:
    shown: tuple[str, ...]
    t_shown: float


class AnswerBook:
    """Open questions and recently resolved ones (thread-safe; the caller acts on what it returns)."""

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._resolved: OrderedDict[str, AnswerKind] = OrderedDict()

    def offer(self, match_id: str, shown: tuple[str, ...]) -> list[Answer]:
        """Ask about ``match_id``; earlier open questions are off the screen now: ``no_answer``."""
        now = self._clock()
        with self._lock:
            superseded = [self._resolve(mid, "no_answer", None, now) for mid in list(self._open)]
            if match_id not in self._resolved:
                self._open[match_id] = _Open(shown, now)
        return superseded

    def answer(self, match_id: str, answer: str, sku: str | None) -> Answer:
        """Take a tap; AnswerRefused naming the problem when it is not one the screen asked for."""
        if answer not in TAPS:
            raise AnswerRefused(400, f"answer must be one of {', '.join(TAPS)}, not {answer!r}")
        with self._lock:
            if match_id in self._resolved:
                got = self._resolved[match_id]
                raise AnswerRefused(409, f"result {match_id} was already answered ({got})")
            q = self._open.get(match_id)
            if q is None:
                raise AnswerRefused(404, f"result {match_id} is not on the screen")
            if answer == "confirmed" and sku not in q.shown:
                raise AnswerRefused(400, f"sku {sku!r} was not shown for result {match_id}")
            if answer == "not_here" and sku is not None:
                raise AnswerRefused(400, "a not_here answer names no sku")
            return self._resolve(match_id, answer, sku, self._clock())  # type: ignore[arg-type]

    def expire(self) -> list[Answer]:
        """Questions open longer than the timeout, resolved as ``no_answer``."""
        now = self._clock()
        with self._lock:
            due = [mid for mid, q in self._open.items() if now - q.t_shown >= self.timeout_s]
            return [self._resolve(mid, "no_answer", None, now) for mid in due]

    def next_due_s(self) -> float | None:
        """Seconds until the oldest open question times out (0 if overdue), None with none open."""
        with self._lock:
            if not self._open:
                return None
            first = min(q.t_shown for q in self._open.values())
        return max(0.0, first + self.timeout_s - self._clock())

    def state(self, match_id: str) -> str | None:
        """``open``, the answer it got, or None when the book does not know it."""
        with self._lock:
            if match_id in self._open:
                return "open"
            return self._resolved.get(match_id)

    def _resolve(self, match_id: str, answer: AnswerKind, sku: str | None, now: float) -> Answer:
        q = self._open.pop(match_id)
        self._resolved[match_id] = answer
        while len(self._resolved) > _RECENT:
            self._resolved.popitem(last=False)
        return Answer(match_id, answer, sku, q.shown, round(now - q.t_shown, 3))
