"""The one shape of a refusal: a stable, machine-readable ``reason`` and a one-line human ``detail``.

Snapshot, release, download, compile and feedback refusals subclass it, keeping their own names and
reason strings (a ``StrEnum`` or plain ``str``); the status, alerts and counters report ``reason``."""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

R = TypeVar("R", bound=str)


class ReasonError(Exception, Generic[R]):
    """An error with a stable ``reason`` and a ``detail``; ``str()`` reads ``"<what> (<reason>): <detail>"``
    or, for a class with no ``what``, ``"<reason>: <detail>"``."""

    what: ClassVar[str] = ""

    def __init__(self, reason: R, detail: str) -> None:
        self.reason: R = reason
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.what} ({self.reason})" if self.what else str(self.reason)
        return f"{head}: {self.detail}"
