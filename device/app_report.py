"""What the kiosk tells the world, composed from the parts the app wires: its status (retained, re-sent
on change), health figures, one match event per held item, and alerts. Nothing here decides what serves."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final

from device.app_build import relative_to
from device.app_connect import ConnectTasks
from device.camera.grab import HEALTHY, CameraState, GrabStage
from device.comms import Comms
from device.detect.detector import Detection, DetectState
from device.feedback import FeedbackRecorder
from device.generations import RetiredModels
from device.generations.serving import Serving
from device.pipeline import ItemResult, Pipeline
from device.screen import ScreenServer
from device.update import Updater
from storelens.protocol import Alert, Health, KioskState, MatchEvent, MatchItem, Status, Topics
from storelens.snapshot import utc_now_iso

_LOGGER = logging.getLogger(__name__)

_STATUS_TICK_S: Final = 0.5  # how often status is re-evaluated (camera, snapshot, updates)
_STEADY_KEPT: Final = 64  # open items whose steady time is remembered (an item unanswered is forgotten)


def epoch_ms(t_monotonic: float) -> float:
    """A ``time.monotonic()`` instant as wall-clock epoch ms (the page's ``performance.timeOrigin`` clock)."""
    return (time.time() - time.monotonic() + t_monotonic) * 1000.0


class Reporter:
    """Status, health, match events and alerts of one kiosk (``started`` is set by the app's start)."""

    def __init__(
        self,
        topics: Topics,
        *,
        boot_id: str,
        app_version: str,
        health_interval_s: float,
        comms: Comms,
        grab: GrabStage,
        pipeline: Pipeline,
        serving: Serving,
        updater: Updater | None,
        screen: ScreenServer | None,
        feedback: FeedbackRecorder,
        stop_event: threading.Event,
    ) -> None:
        self.topics = topics
        self.boot_id = boot_id
        self._app_version = app_version
        self._health_interval_s = health_interval_s
        self._comms = comms
        self._grab = grab
        self._pipeline = pipeline
        self._serving = serving
        self._updater = updater
        self._screen = screen
        self._feedback = feedback
        self._stop_event = stop_event
        self.started = False
        self._t_start = time.monotonic()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._state: tuple[KioskState, str | None] | None = None
        self._status_key: tuple[object, ...] | None = None  # what a status change is judged on
        self._since = utc_now_iso()
        self._status_lock = threading.Lock()
        self._camera_down = False
        self._steady_t: dict[int, float] = {}  # open item -> capture time of its first steady frame
        self._steady_lock = threading.Lock()  # written by the detect thread, read by the search thread

    # -- status and health --
    def status(self) -> Status:
        """The kiosk's state now: updating, degraded (camera, no snapshot) or online."""
        cam = self._grab.state
        snap = self._serving.snapshot
        sync = self._serving.sync
        state, reason = KioskState.ONLINE, None
        if self._updater is not None and not self._updater.idle.is_set():
            state, reason = KioskState.UPDATING, "model update"
        elif sync is not None and not sync.idle.is_set():
            state, reason = KioskState.UPDATING, "snapshot update"
        elif cam not in HEALTHY:
            state, reason = KioskState.DEGRADED, f"camera {cam.value}"
        elif snap is None:
            state, reason = KioskState.DEGRADED, "no snapshot"
        if self._state != (state, reason):
            self._state, self._since = (state, reason), utc_now_iso()
        return Status(
            kiosk=self.topics.kiosk, store=self.topics.store, state=state, reason=reason,
            app=self._app_version, model=self._serving.model_id or None,
            snapshot=snap.version if snap else None, since=self._since, camera=cam.value,
        )

    def refresh_status(self) -> None:
        """Re-evaluate the status; publish it (retained) when it changed, and show it on the screen."""
        with self._status_lock:
            before = self._status_key
            status = self.status()
            self._status_key = (status.state, status.reason, status.model, status.snapshot)
            changed = self._status_key != before
        if self.started and changed and not self._stop_event.is_set():
            _LOGGER.info("kiosk %s%s", status.state.value, f" ({status.reason})" if status.reason else "")
            self._comms.set_status(status)
        if self._screen is not None:
            self._screen.set_status(status=status.state.value, camera=status.camera, snapshot=status.snapshot,
                                    model=self._serving.model_id[:12],
                                    broker="connected" if self._comms.connected else "offline")

    def health(self) -> Health:
        """The current health figures."""
        snap = self._serving.snapshot
        return Health(
            kiosk=self.topics.kiosk, store=self.topics.store,
            uptime_s=round(time.monotonic() - self._t_start, 3), camera=self._grab.state.value,
            frames_in=self._grab.frames_in, frames_processed=self._pipeline.counters.frames_processed,
            frames_dropped=self._grab.frames_dropped, fps=round(self._pipeline.fps(), 2),
            latency_ms=self._pipeline.stats.percentiles(), model=self._serving.model_id,
            snapshot=snap.version if snap else None, interval_s=self._health_interval_s,
        )

    def health_loop(self, stop: threading.Event, connect_tasks: ConnectTasks, retired: RetiredModels) -> None:
        """The kiosk-health thread: deferred re-sends, status, retired models' closing, health every
        interval."""
        next_health = time.monotonic()
        while not stop.is_set():
            try:
                connect_tasks.run_pending()
                self.refresh_status()
                retired.close_due(in_use=self._pipeline.embedders_in_use())
                if time.monotonic() >= next_health:
                    next_health += self._health_interval_s
                    self._comms.publish_health(self.health())
            except Exception:
                _LOGGER.exception("health loop iteration failed")
            stop.wait(min(_STATUS_TICK_S, self._health_interval_s))

    # -- events and alerts --
    def on_frame(self, t_capture: float, det: Detection) -> None:
        """A processed frame (detect thread): remember when each held item first became steady."""
        if det.state is not DetectState.STEADY or det.item_id in self._steady_t:
            return
        with self._steady_lock:
            self._steady_t[det.item_id] = t_capture
            if len(self._steady_t) > _STEADY_KEPT:  # items closed without an answer: drop the oldest
                del self._steady_t[next(iter(self._steady_t))]

    def screen_result(self, event: MatchEvent, r: ItemResult) -> dict[str, Any]:
        """What the screen shows for one answer: the match event, plus ``held_ms`` (epoch ms of the capture
        of the item's first steady frame, None if unseen) and ``answered_ms`` (now), which the page records
        beside its paint time (``window.storelensPaints``)."""
        with self._steady_lock:
            t_steady = self._steady_t.pop(r.item_id, None)
        shown = event.model_dump(mode="json")
        shown["held_ms"] = round(epoch_ms(t_steady), 3) if t_steady is not None else None
        shown["answered_ms"] = round(time.time() * 1000.0, 3)
        return shown

    def on_result(self, r: ItemResult) -> None:
        """One held item's answer: on the screen, then a match event in the outbox."""
        root = r.snapshot_dir  # the snapshot this item was searched in (a swap may have happened since)
        items = [
            MatchItem(rank=i + 1, sku=h.sku, title=h.title, price=h.price, location=h.location,
                      score=round(h.score, 4), thumbnail=relative_to(h.thumbnail, root))
            for i, h in enumerate(r.hits)
        ]
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        event = MatchEvent(
            kiosk=self.topics.kiosk, store=self.topics.store, seq=seq, boot_id=self.boot_id,
            matched=r.matched, results=items, threshold=r.threshold, frames=r.frames,
            model=r.model_id or self._serving.model_id, snapshot=r.snapshot_version, latency_ms=r.latency_ms,
        )
        # The screen first: the shopper does not wait for the event's fsync (4.9 ms p50, 17 ms p99 on the
        # development disk, measured by bench/paint.py); the event is committed right after.
        if self._screen is not None:
            self._feedback.remember(event.id, r)  # references only; built when the customer answers
            self._screen.show_result(self.screen_result(event, r))
        else:
            with self._steady_lock:
                self._steady_t.pop(r.item_id, None)
        self._comms.publish_event(self.topics.match, event.to_bytes())
        _LOGGER.info("item %d: %s (%s, %.3f) v%d", r.item_id, "match" if r.matched else "no match",
                     items[0].sku if items else "-", items[0].score if items else 0.0, r.snapshot_version)

    def on_camera_state(self, old: CameraState, new: CameraState) -> None:
        """One alert per camera-lost episode, however many reopen attempts it takes; status follows."""
        if new is CameraState.STOPPED and self._stop_event.is_set():
            return  # a deliberate stop: the camera is not lost, and the status says offline anyway
        if new not in HEALTHY and not self._camera_down:
            self._camera_down = True
            self.alert("camera_lost", f"camera {new.value}")
        elif new is CameraState.STREAMING and self._camera_down:
            self._camera_down = False
            self.alert("camera_back", f"streaming again after {self._grab.reopens} reopen(s)")
        self.refresh_status()

    def on_refused(self, reason: str, detail: str) -> None:
        """A snapshot refused: an alert naming the reason."""
        self.alert("snapshot_refused", f"{reason}: {detail}"[:500])

    def alert(self, kind: Any, detail: str) -> None:  # Any: Alert.kind checks the name
        """Queue an alert (never raises: a full outbox must not stop what reported it)."""
        alert = Alert(kiosk=self.topics.kiosk, store=self.topics.store, kind=kind, detail=detail)
        try:
            self._comms.publish_event(self.topics.alert, alert.to_bytes())
        except Exception:
            _LOGGER.exception("could not queue %s alert", kind)

