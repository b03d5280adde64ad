"""The feedback collector: a store's kiosk feedback from its broker into the feedback store, none lost.

One paho client with a fixed client id and a persistent session (MQTT 3.1.1, clean_session false,
QoS 1), so what kiosks publish while the collector is down waits at the broker (up to its
``max_queued_messages``). Each message is checked (``verify``), written durably (``FeedbackStore.put``
fsyncs) and only then acknowledged (paho's manual acks): a crash between receipt and write means
redelivery, and a redelivered message that was already written is the same record (``duplicate``).

Refused messages are acknowledged (they would only come back), counted by reason and logged one line
each, at most ``LOG_BURST`` lines per reason in a row. A kiosk over its token bucket is ``rate_limited``:
acknowledged and NOT stored. A write that fails (disk full, permissions) is not acknowledged: the
collector stops taking messages and reports failure, so its supervisor restarts it and the broker
redelivers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.feedback.store import FeedbackStore
from cloud.feedback.verify import KnownSnapshots, Reason, Refused, TokenBuckets, verify
from cloud.mqtt import BrokerError, BrokerSettings, CloudClient, check
from storelens.feedback import FeedbackEvent, store_feedback_filter
from storelens.protocol import ProtocolError, check_id, parse_kiosk_topic

_LOGGER = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0  # to finish the message in hand (one fsynced write) before disconnecting
KEEPALIVE_S = 30
RATE_PER_HOUR = 3600.0  # sustained, per kiosk: ~4x the fastest a customer can hold items up and tap
RATE_BURST = 300  # at once, per kiosk: an outbox replaying ~5 h of a kiosk's feedback cap after an outage
LOG_BURST = 10  # refusal log lines per reason in a row; then LOG_PER_HOUR (a flood costs no disk)
LOG_PER_HOUR = 360.0
FAULT_ENV = "STORELENS_FEEDBACK_FAULT"  # tests only: "before_store" / "before_ack" hold the message there

# The auto-review hook (cloud/feedback/auto.py): called once per newly stored record, after its ack.
# A crash before it runs leaves the record pending: a person reviews it.
OnStored = Callable[[FeedbackStore, str, FeedbackEvent], object]


class CollectorError(Exception):
    """The collector cannot run (broker unreachable or refusing, bad TLS files, subscription refused)."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where and as whom to connect; ``mqtts://`` verifies the broker with ``ca`` (client cert optional)."""

    url: str
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class FeedbackCollector:
    """Subscribes to one store's feedback and stores what passes ``verify`` (see the module doc)."""

    def __init__(
        self,
        store_id: str,
        broker: BrokerConfig,
        feedback: FeedbackStore,
        known: KnownSnapshots,
        *,
        rate_per_hour: float = RATE_PER_HOUR,
        burst: int = RATE_BURST,
        on_stored: OnStored | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store_id = check_id(store_id, "store id")
        self._filter = store_feedback_filter(store_id)
        self._feedback = feedback
        self._known = known
        self._on_stored = on_stored
        self._buckets = TokenBuckets(per_hour=rate_per_hour, burst=burst, clock=clock)
        self._log_buckets = TokenBuckets(per_hour=LOG_PER_HOUR, burst=LOG_BURST, clock=clock)
        self._suppressed: dict[Reason, int] = {}
        self._counts: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self.failed = threading.Event()  # a write failed: stop and let the supervisor restart us
        self._done = threading.Event()  # failed, or request_stop(): what the service's main thread awaits
        self._fault = os.environ.get(FAULT_ENV) or None
        # Bounded in practice by the broker's in-flight window (unacked QoS 1 messages per client).
        self._queue: queue.Queue[tuple[str, bytes, int, int] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="feedback-collector", daemon=True)
        self._connect_error: str | None = None
        settings = BrokerSettings(
            url=broker.url, username=broker.username, password=broker.password,
            ca=_path(broker.ca), cert=_path(broker.cert), key=_path(broker.key),
        )
        try:
            check(settings)
            self._cc = CloudClient(
                settings, client_id=check_id(broker.client_id, "client id"), mqtt5=False,
                clean_session=False,  # the broker keeps our subscription and queues QoS 1 while we are down
                manual_ack=True, on_connected=self._handle_connect, on_disconnected=self._handle_disconnect,
            )
        except BrokerError as exc:
            raise CollectorError(str(exc)) from exc
        self._client = self._cc.client
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_message = self._handle_message

    def __repr__(self) -> str:  # never shows the password
        return f"FeedbackCollector({self.store_id}, {self._cc.where})"

    # ---- lifecycle ----

    def start(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and subscribe (QoS 1); CollectorError when the broker refuses or does not answer."""
        self._worker.start()
        try:
            self._cc.connect(timeout_s)
        except BrokerError as exc:
            self.stop()
            raise CollectorError(str(exc)) from exc
        if not self._subscribed.wait(timeout_s) or self._connect_error:
            self.stop()
            raise CollectorError(f"{self._cc.where}: {self._connect_error or 'no SUBACK in time'}")
        _LOGGER.info("%r collecting %s", self, self._filter)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop taking messages, store and ack those already taken, disconnect (any left unacknowledged
        are redelivered next session)."""
        self._stop.set()
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout_s)
            if self._worker.is_alive():
                _LOGGER.error("feedback worker still busy after %.1f s; its message will be redelivered",
                              timeout_s)  # fmt: skip
        self._cc.close()
        self._connected.clear()
        with self._cond:
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Ask the service to stop (safe from a signal handler); ``wait_done`` returns."""
        self._done.set()

    def wait_done(self, timeout_s: float | None = None) -> bool:
        """Block until a stop was requested or a write failed."""
        return self._done.wait(timeout_s)

    def stats(self) -> dict[str, int]:
        """Messages handled so far, by outcome (every ``Reason``, zeros included)."""
        with self._cond:
            return {r.value: n for r, n in self._counts.items()}

    def wait_handled(self, n: int, timeout_s: float) -> bool:
        """Block until ``n`` messages in all have been handled (stored, refused, duplicate...)."""
        with self._cond:
            return self._cond.wait_for(lambda: sum(self._counts.values()) >= n, timeout_s)

    def summary(self) -> str:
        """One line: every non-zero counter."""
        s = self.stats()
        return ", ".join(f"{k} {v}" for k, v in s.items() if v) or "no messages"

    # ---- one message ----

    def handle(self, topic: str, payload: bytes) -> Reason:
        """Check, rate-limit and store one message; the outcome. OSError/FeedbackStoreError: not stored."""
        return self._process(topic, payload)[0]

    def _process(self, topic: str, payload: bytes) -> tuple[Reason, str, FeedbackEvent | None]:
        try:
            _, kiosk, _ = parse_kiosk_topic(topic)
        except ProtocolError as exc:
            return self._refused(topic, Refused(Reason.BAD_TOPIC, str(exc))), "", None
        if not self._buckets.take(kiosk):
            refusal = Refused(Reason.RATE_LIMITED, f"kiosk {kiosk} over its rate limit")
            return self._refused(topic, refusal), "", None
        try:
            msg = verify(topic, payload, store=self.store_id, known=self._known)
        except Refused as exc:
            return self._refused(topic, exc), "", None
        self._hold("before_store")
        rid, new = self._feedback.put(msg)
        outcome = Reason.STORED if new else Reason.DUPLICATE
        _LOGGER.info("%s %s from %s/%s (%s%s)", outcome.value, rid, msg.store, msg.kiosk, msg.answer,
                     f" {msg.chosen_sku}" if msg.chosen_sku else "")  # fmt: skip
        self._count(outcome)
        return outcome, rid, msg

    def _refused(self, topic: str, exc: Refused) -> Reason:
        self._count(exc.reason)
        if self._log_buckets.take(exc.reason.value):
            more = self._suppressed.pop(exc.reason, 0)
            _LOGGER.warning("refused %s on %s: %s%s", exc.reason.value, topic[:200], exc.detail[:300],
                            f" (+{more} more not logged)" if more else "")  # fmt: skip
        else:
            self._suppressed[exc.reason] = self._suppressed.get(exc.reason, 0) + 1
        return exc.reason

    def _count(self, reason: Reason) -> None:
        with self._cond:
            self._counts[reason] += 1
            self._cond.notify_all()

    def _hold(self, point: str) -> None:
        """Fault injection for the kill tests: announce the point, then never go past it."""
        if self._fault == point:
            _LOGGER.warning("fault injection: holding a message %s", point)
            self._stop.wait()
            raise _Held

    # ---- the worker: one message at a time, in arrival order (acks go out in order) ----

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.failed.is_set():
                continue  # not acknowledged: redelivered in the next session
            self._one(*item)

    def _one(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        try:
            outcome, rid, event = self._process(topic, payload)
            if outcome is Reason.STORED:
                self._hold("before_ack")
        except _Held:
            return
        except Exception:  # disk full, permissions, a bug: not acknowledged; stop, be restarted
            _LOGGER.exception("cannot store feedback from %s: not acknowledged, stopping", topic)
            self.failed.set()
            self._done.set()
            return
        self._client.ack(mid, qos)  # only now: the record is durable (or the message refused)
        if outcome is Reason.STORED and event is not None and self._on_stored is not None:
            try:
                self._on_stored(self._feedback, rid, event)
            except Exception:  # the record stays pending for a person
                _LOGGER.exception("auto-review hook failed on %s; left for staff review", rid)

    # ---- paho callbacks (paho's network thread: never blocked by a write, so pings go on) ----

    def _handle_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self._stop.is_set():
            return  # not acknowledged: redelivered in the next session
        self._queue.put((msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    def _handle_connect(self, client: Any, session_present: bool) -> None:
        self._connected.set()
        _LOGGER.info("%r connected (session present: %s)", self, session_present)
        client.subscribe(self._filter, qos=1)

    def _handle_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._connect_error = f"subscription to {self._filter} refused (ACL?): {reasons[0]}"
        self._subscribed.set()

    def _handle_disconnect(self, reason: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            _LOGGER.warning("%r lost the broker (%s); reconnecting", self, reason)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


class _Held(Exception):
    """Raised past a fault-injection hold (only once stopping)."""
