"""Comms: transport + durable outbox + retained status, with the one thread that drains the outbox."""

from __future__ import annotations

import logging
import threading
import time

from device.comms.held import DEFAULT_MEMORY_CAP_EVENTS, HeldEvents
from device.comms.outbox import Outbox, OutboxError
from device.comms.port import OnMessage, Transport
from storelens.protocol import Alert, Health, KioskState, Status, Topics

_LOGGER = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0  # wait for a PUBACK; longer only delays noticing a dead link
CONNECT_TIMEOUT_S = 5.0  # start() waits this long for the first connection, then goes on offline
RETRY_INTERVAL_S = 1.0  # after a failed publish while "connected": back off before the next try
IDLE_WAIT_S = 1.0  # drain thread re-checks at least this often
BATCH_ROWS = 64  # rows read per outbox query
DROP_ALERT_INTERVAL_S = 60.0  # at most one outbox_dropping alert per minute
OUTBOX_RETRY_S = 1.0  # while the outbox cannot be written: retry held events this often (one fsync each)
FLUSH_BATCH = 256  # held events written per outbox transaction when space returns


class Comms:
    """Publishes events durably (outbox, QoS 1, in order, bounded rate) and keeps a retained status.

    While started, ``publish_event`` hands each event to the outbox writer thread and returns: the frame
    path never waits for the disk (an fsync is ~1 ms on a VM disk, 10-100 ms on a busy SD card). The writer
    commits whatever arrived meanwhile in one transaction (a group commit), so an event is durable after
    at most the commit in progress plus its own: the same moment it became durable when the caller
    committed it itself, without the caller waiting. ``flush`` waits for that moment.
    The outbox is owned by the caller (close it after ``stop``); the transport is closed by ``stop``.
    When the outbox cannot be written (disk full), ``publish_event`` still returns: events wait in memory
    (``memory_cap`` events; past it the oldest is dropped, counted in ``outbox_dropped`` and alerted as
    ``outbox_dropping``), an ``outbox_full`` alert goes out, and the drain thread writes them into the
    outbox, in order, as soon as it takes writes again. Only a power cut in that window loses them.
    """

    def __init__(
        self,
        transport: Transport,
        outbox: Outbox,
        topics: Topics,
        *,
        app_version: str,
        replay_rate_per_s: float = 50.0,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        memory_cap: int = DEFAULT_MEMORY_CAP_EVENTS,
    ) -> None:
        if replay_rate_per_s <= 0:
            raise ValueError("replay_rate_per_s must be > 0")
        self._transport = transport
        self._outbox = outbox
        self._topics = topics
        self._app_version = app_version
        self._min_gap_s = 1.0 / replay_rate_per_s  # pacing: IoT Core allows 100 publishes/s per connection
        self._publish_timeout_s = publish_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._status: Status | None = None
        self._status_dirty = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_send_s = float("-inf")
        self._dropped_reported = outbox.dropped
        self._last_drop_alert_s = float("-inf")
        self._held = HeldEvents(memory_cap)
        self._held_lock = threading.Lock()  # orders outbox writes: nothing overtakes a held event
        self._full_error: str | None = None  # the outbox's write error, while events are held
        self._full_alert_due = False
        self._full_alert_error = ""
        self._last_flush_s = float("-inf")
        self._outbox_dropped_logged = 0  # held drops already logged (one error line per episode)
        # Events handed in while the writer runs, not yet written or held (oldest first).
        self._pending: list[tuple[str, bytes, int]] = []
        self._pending_cond = threading.Condition()
        self._handed = self._settled = 0  # events handed to the writer / written, held or dropped
        self._pending_dropped = 0  # handed in past the memory cap while the writer was stuck: lost
        self._writer: threading.Thread | None = None
        self._writer_stop = threading.Event()
        self.sent = 0  # rows acked by the broker since start (for tests and health)

    # -- lifecycle --
    def start(self, status: Status) -> None:
        """Connect (retained will = offline/lwt) and start draining; the status is sent on every connect."""
        if self._thread is not None:
            raise RuntimeError("Comms already started")
        with self._lock:
            self._status, self._status_dirty = status, True
        will = self._status_like(status, KioskState.OFFLINE, "lwt").to_bytes()
        self._writer_stop.clear()
        self._writer = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._writer.start()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="comms-drain", daemon=True)
        self._thread.start()
        self._transport.connect(
            will=(self._topics.status, will), timeout_s=self._connect_timeout_s, on_connect=self._on_connect
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop draining, publish a retained offline status explicitly, then close the transport."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOGGER.error("comms drain thread still alive after %.1f s", timeout_s)
            self._thread = None
        self._stop_writer(timeout_s)
        self._flush_held(force=True)
        with self._held_lock:
            if len(self._held):
                _LOGGER.error("outbox still cannot be written: %d held events lost at stop", len(self._held))
        with self._lock:
            status = self._status
        if status is not None and self._transport.connected:
            offline = self._status_like(status, KioskState.OFFLINE, "shutdown")
            if not self._transport.publish(
                self._topics.status, offline.to_bytes(), qos=1, retain=True, timeout_s=min(timeout_s, 2.0)
            ):
                _LOGGER.warning("offline status not acknowledged at shutdown (the will covers it)")
        self._transport.close()

    # -- API --
    def publish_event(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Hand the event to the outbox writer (started) or commit it here (not started); then the drain
        thread sends it. Never blocks on the network, never on the disk while started.

        Never raises for a full disk: the event then waits in memory (see the class docstring).
        """
        with self._pending_cond:
            if self._writer is not None:
                if len(self._pending) >= self._held.cap:  # a disk hung inside a commit: bounded, counted
                    self._pending.pop(0)
                    self._pending_dropped += 1
                    self._settled += 1  # settled: dropped for good
                    if self._pending_dropped == 1:
                        _LOGGER.error("outbox writer stuck: %d events wait, dropping the oldest (counted)",
                                      self._held.cap)  # fmt: skip
                self._pending.append((topic, bytes(payload), qos))
                self._handed += 1
                self._pending_cond.notify_all()
                return
        self._write([(topic, bytes(payload), qos)])

    def flush(self, timeout_s: float = PUBLISH_TIMEOUT_S) -> bool:
        """Wait until every event handed in so far is in the outbox or held in memory; False on timeout."""
        with self._pending_cond:
            target = self._handed
            return self._pending_cond.wait_for(lambda: self._settled >= target, timeout_s)

    def _write(self, batch: list[tuple[str, bytes, int]]) -> None:
        """Commit ``batch`` in one transaction, behind any held events (held too if the disk is full)."""
        with self._held_lock:
            if not len(self._held):
                try:
                    self._outbox.put_many(batch)
                    batch = []
                except OutboxError as exc:
                    self._on_outbox_full(exc)
            for topic, payload, qos in batch:
                self._hold(topic, payload, qos)
        self._wake.set()

    def _write_loop(self) -> None:
        """The outbox writer: commit what was handed in (one transaction a round), retry held events."""
        while True:
            with self._pending_cond:
                retry_s = (max(0.05, self._last_flush_s + OUTBOX_RETRY_S - time.monotonic())
                           if len(self._held) else None)  # fmt: skip
                self._pending_cond.wait_for(lambda: bool(self._pending) or self._writer_stop.is_set(),
                                            retry_s)  # fmt: skip
                batch, self._pending = self._pending, []
                if not batch and self._writer_stop.is_set():
                    return
            try:
                self._flush_held()
                if batch:
                    self._write(batch)
            except Exception:  # never lose the thread: the events are held and retried
                _LOGGER.exception("outbox writer failed")
                with self._held_lock:
                    for topic, payload, qos in batch:
                        self._hold(topic, payload, qos)
            with self._pending_cond:
                self._settled += len(batch)
                self._pending_cond.notify_all()

    def _stop_writer(self, timeout_s: float) -> None:
        """Stop the writer once it has written what was handed in; later events are committed inline."""
        with self._pending_cond:
            writer, self._writer = self._writer, None
            self._writer_stop.set()
            self._pending_cond.notify_all()
        if writer is not None:
            writer.join(timeout_s)
            if writer.is_alive():
                _LOGGER.error("outbox writer still alive after %.1f s", timeout_s)
        with self._pending_cond:
            batch, self._pending = self._pending, []
        if batch:
            self._write(batch)
        with self._pending_cond:
            self._settled += len(batch)
            self._pending_cond.notify_all()

    def set_status(self, status: Status) -> None:
        """Replace the retained status; sent at once if connected and again on every reconnect."""
        with self._lock:
            self._status, self._status_dirty = status, True
        self._wake.set()

    def publish_health(self, health: Health) -> None:
        """Retained QoS 0 health with the outbox figures filled in; skipped while offline."""
        health = health.model_copy(
            update={"outbox_depth": self._outbox.depth, "outbox_dropped": self.outbox_dropped,
                    "outbox_memory": self.outbox_memory}
        )
        if not self._transport.publish(
            self._topics.health, health.to_bytes(), qos=0, retain=True, timeout_s=self._publish_timeout_s
        ):
            _LOGGER.debug("health not sent (offline)")

    def subscribe(self, topic: str, on_message: OnMessage) -> None:
        """Subscribe through the transport (re-subscribed after reconnects)."""
        self._transport.subscribe(topic, on_message)

    @property
    def outbox_depth(self) -> int:
        return self._outbox.depth

    @property
    def outbox_dropped(self) -> int:
        """Events dropped for good: by the outbox's row/age bounds, or past the memory cap."""
        return self._outbox.dropped + self._held.dropped + self._pending_dropped

    @property
    def outbox_memory(self) -> int:
        """Events waiting in memory for the outbox to take writes again."""
        return len(self._held)

    @property
    def connected(self) -> bool:
        return self._transport.connected

    # -- drain thread --
    def run(self, stop: threading.Event) -> None:
        """Drain loop: status first, then outbox rows in id order, each removed only on its PUBACK."""
        while not stop.is_set():
            try:
                if not self._transport.connected:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                if not self._send_status():
                    stop.wait(RETRY_INTERVAL_S)
                    continue
                self._report_drops()
                self._report_full()
                self._wake.clear()
                rows = self._outbox.peek(BATCH_ROWS)
                if not rows:
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                for row in rows:
                    if stop.is_set() or self._status_dirty:
                        break
                    self._pace(stop)
                    if not self._transport.publish(
                        row.topic, row.payload, qos=row.qos, retain=False, timeout_s=self._publish_timeout_s
                    ):
                        _LOGGER.debug("row %d not acked; retrying after reconnect/backoff", row.id)
                        stop.wait(RETRY_INTERVAL_S if self._transport.connected else 0.0)
                        break
                    self._outbox.ack(row.id)
                    self.sent += 1
            except OutboxError as exc:  # e.g. an ack on a full disk: the row is sent again later
                _LOGGER.warning("outbox error in drain loop: %s", exc)
                stop.wait(RETRY_INTERVAL_S)
            except Exception:
                _LOGGER.exception("unexpected error in comms drain loop")
                stop.wait(RETRY_INTERVAL_S)

    def _pace(self, stop: threading.Event) -> None:
        wait_s = self._last_send_s + self._min_gap_s - time.monotonic()
        if wait_s > 0:
            stop.wait(wait_s)
        self._last_send_s = time.monotonic()

    def _send_status(self) -> bool:
        with self._lock:
            status, dirty = self._status, self._status_dirty
            self._status_dirty = False
        if not dirty or status is None:
            return True
        if self._transport.publish(
            self._topics.status, status.to_bytes(), qos=1, retain=True, timeout_s=self._publish_timeout_s
        ):
            return True
        with self._lock:
            if self._status is status:
                self._status_dirty = True
        return False

    def _hold(self, topic: str, payload: bytes, qos: int) -> None:
        if self._held.hold(topic, payload, qos) and self._held.dropped == 1 + self._outbox_dropped_logged:
            _LOGGER.error("%d events held in memory: dropping the oldest (counted, alerted)", self._held.cap)
            self._outbox_dropped_logged = self._held.dropped

    def _on_outbox_full(self, exc: OutboxError) -> None:
        if self._full_error is None:
            _LOGGER.warning("outbox cannot be written (%s): events wait in memory (at most %d)",
                            exc, self._held.cap)
            self._full_alert_due = True  # sent once connected, even if space returned by then
        self._full_error = self._full_alert_error = str(exc)
        self._last_flush_s = time.monotonic()

    def _flush_held(self, *, force: bool = False) -> None:
        """Write held events into the outbox, oldest first, while it takes them (at most every retry)."""
        if not len(self._held) or (not force and time.monotonic() - self._last_flush_s < OUTBOX_RETRY_S):
            return
        with self._held_lock:
            written = 0
            while len(self._held):
                batch = self._held.head(FLUSH_BATCH)
                try:
                    self._outbox.put_many(batch)
                except OutboxError as exc:
                    self._on_outbox_full(exc)
                    return
                self._held.release(len(batch))
                written += len(batch)
            if self._full_error is not None:
                _LOGGER.warning("outbox writable again: %d held events written", written)
                self._full_error = None
                self._outbox_dropped_logged = self._held.dropped
        self._wake.set()

    def _report_full(self) -> None:
        if not self._full_alert_due:
            return
        error = self._full_alert_error
        alert = Alert(
            kiosk=self._topics.kiosk,
            store=self._topics.store,
            kind="outbox_full",
            detail=f"outbox cannot be written ({error}); {len(self._held)} events wait in memory "
            f"(at most {self._held.cap}, then the oldest are dropped)"[:500],
        )
        if self._transport.publish(
            self._topics.alert, alert.to_bytes(), qos=1, retain=False, timeout_s=self._publish_timeout_s
        ):
            self._full_alert_due = False

    def _report_drops(self) -> None:
        dropped = self.outbox_dropped
        now = time.monotonic()
        if dropped <= self._dropped_reported or now - self._last_drop_alert_s < DROP_ALERT_INTERVAL_S:
            return
        alert = Alert(
            kiosk=self._topics.kiosk,
            store=self._topics.store,
            kind="outbox_dropping",
            detail=f"{dropped - self._dropped_reported} events dropped ({dropped} in total)",
        )
        if self._transport.publish(
            self._topics.alert, alert.to_bytes(), qos=1, retain=False, timeout_s=self._publish_timeout_s
        ):
            self._dropped_reported, self._last_drop_alert_s = dropped, now

    def _on_connect(self) -> None:
        with self._lock:
            self._status_dirty = self._status is not None
        self._wake.set()

    def _status_like(self, status: Status, state: KioskState, reason: str) -> Status:
        return status.model_copy(
            update={"state": state, "reason": reason, "app": status.app or self._app_version}
        )
