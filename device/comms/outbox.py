"""Durable outbox: an event is committed to SQLite before it is published and removed only on ack.

paho's in-memory queue dies with the process; this file is the source of truth for events. WAL with
``synchronous=FULL`` so a committed row survives power loss (NORMAL may roll back the last commits).
Bounded by rows and age: the oldest rows are dropped first and every drop is counted (persisted).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 100_000  # ~2.8 h at 10 events/s, days at kiosk rates; ~50 MB of small JSON rows
DEFAULT_MAX_AGE_S = 7 * 86400.0  # a week-old match event is of no use to anyone
_AGE_CHECK_INTERVAL_S = 1.0  # age pruning runs at most this often (a DELETE per put would cost an fsync)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox(created_s);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('dropped', 0);
"""


class OutboxError(Exception):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    created_s: float


class Outbox:
    """A bounded FIFO of (topic, payload) rows in one SQLite file; safe to share between threads."""

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.path = Path(path)
        self._max_rows = max_rows
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_age_check_s = float("-inf")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            self._dropped = int(self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0])
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        if self._depth:
            _LOGGER.info("outbox %s holds %d unacked rows to replay", self.path, self._depth)

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Commit one row (durable when this returns) and return its id; drops the oldest when full."""
        now = self._clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO outbox(topic, payload, qos, created_s) VALUES (?, ?, ?, ?)",
                    (topic, bytes(payload), int(qos), now),
                )
                row_id = int(cur.lastrowid or 0)
                dropped = self._trim_locked(now)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback_locked()
                raise OutboxError(f"cannot write outbox {self.path}: {exc}") from exc
            self._depth += 1 - dropped
            self._dropped += dropped
        if dropped:
            _LOGGER.warning(
                "outbox full or stale: dropped %d oldest rows (%d in total)", dropped, self._dropped
            )
        return row_id

    def put_many(self, rows: list[tuple[str, bytes, int]]) -> list[int]:
        """Commit ``(topic, payload, qos)`` rows in one transaction (all or none) and return their ids."""
        if not rows:
            return []
        now = self._clock()
        ids: list[int] = []
        dropped = 0
        with self._lock:
            depth0 = self._depth
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for topic, payload, qos in rows:
                    cur = self._db.execute(
                        "INSERT INTO outbox(topic, payload, qos, created_s) VALUES (?, ?, ?, ?)",
                        (topic, bytes(payload), int(qos), now),
                    )
                    ids.append(int(cur.lastrowid or 0))
                    n = self._trim_locked(now)
                    dropped += n
                    self._depth += 1 - n
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._depth = depth0
                self._rollback_locked()
                raise OutboxError(f"cannot write outbox {self.path}: {exc}") from exc
            self._dropped += dropped
        if dropped:
            _LOGGER.warning(
                "outbox full or stale: dropped %d oldest rows (%d in total)", dropped, self._dropped
            )
        return ids

    def peek(self, n: int) -> list[Row]:
        """The ``n`` oldest rows, oldest first (not removed)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, created_s FROM outbox ORDER BY id LIMIT ?", (int(n),)
            ).fetchall()
        return [Row(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), float(r[4])) for r in rows]

    def ack(self, row_id: int) -> None:
        """Remove a row once the broker acknowledged it (a row already dropped is ignored)."""
        with self._lock:
            try:
                cur = self._db.execute("DELETE FROM outbox WHERE id = ?", (int(row_id),))
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot ack row {row_id}: {exc}") from exc
            self._depth -= cur.rowcount

    @property
    def depth(self) -> int:
        """Rows waiting for an ack."""
        return self._depth

    @property
    def dropped(self) -> int:
        """Rows dropped because the outbox was full or they were too old (persisted across restarts)."""
        return self._dropped

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result ("ok" when healthy)."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        """Checkpoint and close the database."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                _LOGGER.warning("outbox checkpoint failed at close", exc_info=True)
            self._db.close()

    def _trim_locked(self, now: float) -> int:
        dropped = 0
        if now - self._last_age_check_s >= _AGE_CHECK_INTERVAL_S:
            self._last_age_check_s = now
            cur = self._db.execute("DELETE FROM outbox WHERE created_s < ?", (now - self._max_age_s,))
            dropped += cur.rowcount
        over = self._depth + 1 - dropped - self._max_rows
        if over > 0:
            cur = self._db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (over,)
            )
            dropped += cur.rowcount
        if dropped:
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
        return dropped

    def _rollback_locked(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        try:  # a failed write is usually a full disk: give the WAL's space back (it only grows otherwise)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
