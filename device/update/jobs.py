"""AWS IoT Jobs, device side, over the Transport port (paho or awsiotsdk): the reserved MQTT topics.

    $aws/things/{thing}/jobs/notify-next                 the next queued execution is announced
    $aws/things/{thing}/jobs/start-next[/accepted|/rejected]   take it (QUEUED -> IN_PROGRESS) + document
    $aws/things/{thing}/jobs/{jobId}/update[/accepted|/rejected]   IN_PROGRESS / SUCCEEDED / FAILED

``JobsBridge`` turns a job into a DesiredRelease for the Updater and the Updater's progress into execution
updates (statusDetails are strings only, as the Jobs API requires).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

from device.comms.port import Transport
from device.generations import UpdateFailed
from device.update.updater import Updater
from storelens.protocol import UpdateProgress
from storelens.release import desired_from_job

_LOGGER = logging.getLogger(__name__)

RESPONSE_TIMEOUT_S = 10.0  # the Jobs service answers in well under a second; longer is a lost response
_TERMINAL = {"done": "SUCCEEDED", "failed": "FAILED", "rolled_back": "FAILED"}


class JobsClient:
    """The Jobs MQTT API for one thing. Work a message triggers (start-next, ``on_job``) goes to ``defer``:
    transport callbacks must not block, and a publish waits for its PUBACK on that very thread."""

    def __init__(
        self,
        transport: Transport,
        thing: str,
        on_job: Callable[[str, dict[str, Any]], None],
        defer: Callable[[Callable[[], None]], None],
    ) -> None:
        self._t = transport
        self._defer = defer
        self.thing = thing
        self.base = f"$aws/things/{thing}/jobs"
        self._on_job = on_job
        self._lock = threading.Lock()
        self._waiters: dict[str, tuple[threading.Event, list[bool]]] = {}

    def start(self) -> None:
        """Subscribe to the reserved topics and ask for a job already queued (e.g. while we were off)."""
        self._t.subscribe(f"{self.base}/notify-next", self._on_notify)
        self._t.subscribe(f"{self.base}/start-next/accepted", self._on_started)
        self._t.subscribe(f"{self.base}/start-next/rejected", self._on_response)
        self._t.subscribe(f"{self.base}/+/update/accepted", self._on_response)
        self._t.subscribe(f"{self.base}/+/update/rejected", self._on_response)
        self.start_next()

    def start_next(self) -> None:
        """Publish start-next (the answer arrives on start-next/accepted)."""
        body = {"clientToken": uuid.uuid4().hex[:32]}
        self._t.publish(
            f"{self.base}/start-next",
            json.dumps(body).encode(),
            qos=1,
            retain=False,
            timeout_s=RESPONSE_TIMEOUT_S,
        )

    def update(
        self, job_id: str, status: str, details: dict[str, str], *, timeout_s: float = RESPONSE_TIMEOUT_S
    ) -> bool:
        """Publish an execution update and wait for its accepted (True) / rejected or no answer (False)."""
        token = uuid.uuid4().hex[:32]
        done, result = threading.Event(), [False]
        with self._lock:
            self._waiters[token] = (done, result)
        body = {
            "status": status,
            "statusDetails": {k: str(v)[:1024] for k, v in details.items()},
            "clientToken": token,
        }
        try:
            if not self._t.publish(
                f"{self.base}/{job_id}/update",
                json.dumps(body).encode(),
                qos=1,
                retain=False,
                timeout_s=timeout_s,
            ):
                return False
            done.wait(timeout_s)
            return result[0]
        finally:
            with self._lock:
                self._waiters.pop(token, None)

    # -- callbacks (transport thread) --
    def _on_notify(self, topic: str, payload: bytes, retained: bool) -> None:
        msg = _json(payload)
        if isinstance(msg.get("execution"), dict):
            self._defer(self.start_next)

    def _on_started(self, topic: str, payload: bytes, retained: bool) -> None:
        self._on_response(topic, payload, retained)
        ex = _json(payload).get("execution")
        if not isinstance(ex, dict) or not isinstance(ex.get("jobId"), str):
            return  # no job queued
        job_id, doc = ex["jobId"], ex.get("jobDocument") or {}
        self._defer(lambda: self._on_job(job_id, doc))

    def _on_response(self, topic: str, payload: bytes, retained: bool) -> None:
        msg = _json(payload)
        token = msg.get("clientToken")
        with self._lock:
            waiter = self._waiters.get(token) if isinstance(token, str) else None
        if waiter is None:
            if topic.endswith("/rejected"):
                _LOGGER.warning("jobs request rejected on %s: %s", topic, msg.get("message"))
            return
        waiter[1][0] = topic.endswith("/accepted")
        waiter[0].set()


class JobsBridge:
    """Job -> Updater.submit; Updater progress -> execution updates, sent from the bridge's own thread."""

    def __init__(self, transport: Transport, thing: str, updater: Updater) -> None:
        self.jobs = JobsClient(transport, thing, self._on_job, self._q_put)
        self._updater = updater
        self._job: tuple[str, str] | None = None  # (job id, release)
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.sent: list[tuple[str, str, bool]] = []  # (job id, status, accepted): for health and tests

    def start(self) -> None:
        self._updater.listeners.append(self._on_progress)
        self._thread = threading.Thread(target=self._run, name="jobs-bridge", daemon=True)
        self._thread.start()
        self.jobs.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._on_progress in self._updater.listeners:
            self._updater.listeners.remove(self._on_progress)
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOGGER.error("jobs-bridge thread still alive after %.1f s", timeout_s)
            self._thread = None

    def _on_job(self, job_id: str, doc: dict[str, Any]) -> None:
        t = self._updater.topics
        try:
            desired = desired_from_job(doc, store=t.store, kiosk=t.kiosk)
            self._updater.check_desired(desired)  # its URLs must lie under the kiosk's sources
        except ValueError as exc:
            self._send(job_id, "REJECTED", {"step": "verify", "error": str(exc)[:200]})
            return
        except UpdateFailed as exc:
            self._send(job_id, "REJECTED", {"step": exc.step, "error": f"{exc.reason}: {exc.detail}"[:200]})
            return
        self._job = (job_id, desired.release)
        self._updater.submit(desired)

    def _on_progress(self, p: UpdateProgress) -> None:
        job = self._job
        if job is None or job[1] != p.release:
            return
        status = _TERMINAL.get(p.step, "IN_PROGRESS")
        details = {"step": p.step, "release": p.release, "ok": str(p.ok).lower()}
        if p.detail:
            details["detail"] = p.detail[:200]
        self._q_put(lambda: self._send(job[0], status, details))
        if status != "IN_PROGRESS":
            self._job = None

    def _q_put(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _send(self, job_id: str, status: str, details: dict[str, str]) -> None:
        ok = self.jobs.update(job_id, status, details)
        self.sent.append((job_id, status, ok))
        if status != "IN_PROGRESS":
            self.jobs.start_next()  # the next queued execution, if any

    def _run(self) -> None:
        while (fn := self._q.get()) is not None:
            try:
                fn()
            except Exception:
                _LOGGER.exception("jobs bridge task failed")


def _json(payload: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return msg if isinstance(msg, dict) else {}
