"""The durable outbox: commit before publish, survive SIGKILL, keep order, stay bounded."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.comms.outbox import Outbox

REPO = Path(__file__).resolve().parents[3]

_CHILD = """
import sys
from pathlib import Path
from device.comms.outbox import Outbox
box = Outbox(Path(sys.argv[1]))
for i in range(100_000):
    row = box.put("t/events", b'{"seq":%d}' % i)
    print(row, flush=True)
"""


def test_put_is_committed_before_it_returns(tmp_path: Path) -> None:
    """Guards: a row only in a pending transaction (another connection would not see it)."""
    box = Outbox(tmp_path / "o.db")
    row_id = box.put("t", b"x")
    other = sqlite3.connect(tmp_path / "o.db")
    assert other.execute("SELECT id, topic, payload FROM outbox").fetchall() == [(row_id, "t", b"x")]
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    box.close()


def test_rows_survive_sigkill_of_the_writer(tmp_path: Path) -> None:
    """Guards: losing events that were committed when the kiosk process was killed."""
    db = tmp_path / "o.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, cwd=REPO, text=True
    )
    assert proc.stdout is not None
    committed = [int(proc.stdout.readline()) for _ in range(300)]
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    box = Outbox(db)
    ids = [r.id for r in box.peek(100_000)]
    assert set(committed) <= set(ids), "a row reported committed is gone"
    assert ids == sorted(ids)
    assert box.integrity_check() == "ok"
    box.close()


def test_replay_order_and_ack(tmp_path: Path) -> None:
    """Guards: replay out of order, or ack removing the wrong row."""
    box = Outbox(tmp_path / "o.db")
    ids = [box.put("t", b"%d" % i) for i in range(10)]
    box.ack(ids[3])
    box.close()
    box = Outbox(tmp_path / "o.db")
    rows = box.peek(100)
    assert [r.payload for r in rows] == [b"%d" % i for i in range(10) if i != 3]
    assert box.depth == 9
    box.ack(12345)  # unknown id: no-op
    assert box.depth == 9
    box.close()


def test_bounded_by_rows_drops_oldest_and_counts(tmp_path: Path) -> None:
    """Guards: an unbounded outbox filling the disk during a long outage, or silent drops."""
    box = Outbox(tmp_path / "o.db", max_rows=50)
    for i in range(80):
        box.put("t", b"%d" % i)
    assert box.depth == 50
    assert box.dropped == 30
    assert [r.payload for r in box.peek(1)] == [b"30"]
    box.close()
    box = Outbox(tmp_path / "o.db", max_rows=50)
    assert box.dropped == 30, "drop counter is persisted"
    assert box.integrity_check() == "ok"
    box.close()


def test_bounded_by_age(tmp_path: Path) -> None:
    """Guards: week-old events replayed forever."""
    now = [1000.0]
    box = Outbox(tmp_path / "o.db", max_age_s=60.0, clock=lambda: now[0])
    for i in range(5):
        box.put("t", b"old%d" % i)
    now[0] += 120.0
    box.put("t", b"new")
    assert [r.payload for r in box.peek(10)] == [b"new"]
    assert box.dropped == 5
    box.close()


@pytest.mark.slow
def test_put_rate_measured(tmp_path: Path) -> None:
    """Measures durable puts/s (synchronous=FULL) so the figure in the report is real."""
    box = Outbox(tmp_path / "o.db")
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        box.put("t", b'{"seq":%d,"pad":"%s"}' % (i, b"x" * 200))
    rate = n / (time.perf_counter() - t0)
    print(f"outbox put rate: {rate:.0f}/s")
    assert rate > 20
    box.close()
