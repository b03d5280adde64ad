"""The adversarial suite: generated attacks and bad luck, with a tally printed at the end of the run.

Each test generates its cases (every file, every field, every crash point...) and records each outcome
with ``tally.record(family, outcome)``; the terminal summary prints cases tried, refused, survived and
lost per family (docs/NOTES.md quotes it). The goal is 100% refused (or survived, for bad luck), 0 lost,
0 tracebacks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Literal

import pytest

Outcome = Literal["refused", "survived", "lost", "accepted", "traceback"]
_TALLY: dict[str, Counter[str]] = defaultdict(Counter)


class Tally:
    """Counts the outcome of each generated case, by family (e.g. ``snapshot:extra_file``)."""

    def record(self, family: str, outcome: Outcome) -> None:
        _TALLY[family][outcome] += 1


@pytest.fixture
def tally() -> Iterator[Tally]:
    yield Tally()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/adversarial/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.adversarial)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TALLY:
        return
    tr = terminalreporter
    tr.section("adversarial tally")
    cols = ("refused", "survived", "accepted", "lost", "traceback")
    tr.write_line(f"{'family':<40} {'tried':>6} " + " ".join(f"{c:>9}" for c in cols))
    total: Counter[str] = Counter()
    for family in sorted(_TALLY):
        c = _TALLY[family]
        total.update(c)
        tr.write_line(f"{family:<40} {sum(c.values()):>6} " + " ".join(f"{c[k]:>9}" for k in cols))
    tr.write_line(f"{'all':<40} {sum(total.values()):>6} " + " ".join(f"{total[k]:>9}" for k in cols))
