"""The kiosk's composition root: builds every component from the config, starts them in dependency order
(model pair, comms, snapshots, updater, screen, pipeline, camera, health) and stops them in reverse.

The model and the snapshot it built are one reference (a ModelPair): the pipeline reads it once per held
item, the snapshot sync swaps its snapshot, the updater swaps both; nothing is mutated in place."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from device.app_build import default_synthetic, make_embedder, make_transport, relative_to
from device.app_update import ConnectTasks, HookedTransport, SwitchProbe, sync_dir, update_settings
from device.camera.buffer import BoundedQueue, Frame, OverflowPolicy
from device.camera.grab import HEALTHY, CameraState, GrabStage
from device.camera.port import Image
from device.camera.sources import open_source_factory, source_is_live
from device.comms import Comms, Outbox, Transport
from device.config import KioskConfig
from device.detect.detector import Detection, HeldItemDetector
from device.feedback import FeedbackRecorder
from device.notify import CAMERA_RETRYING, Notifier
from device.pipeline import ItemResult, ModelPair, Pipeline, as_async, limit_blas_threads
from device.screen import ScreenServer
from device.sync import ActiveSnapshot, SnapshotRefused, SnapshotStore, SnapshotSync, Sources
from device.update import JobsBridge, LoadedPair, Pair, Updater, configured_pair
from device.update.pairs import RetiredModels, close_embedder
from storelens import __version__
from storelens.ha_discovery import HaDiscovery
from storelens.protocol import (
    Alert,
    Health,
    KioskState,
    MatchEvent,
    MatchItem,
    Status,
    Topics,
    UpdateProgress,
)
from storelens.signing import load_public_key
from storelens.snapshot import utc_now_iso

_LOGGER = logging.getLogger(__name__)

_STATUS_TICK_S: Final = 0.5  # how often status is re-evaluated (camera, snapshot, updates)
_DRAIN_AT_EOF_S: Final = 10.0  # --exit-at-eof: wait this long for the outbox to empty before stopping
_DEFERRED_PUBLISH_TIMEOUT_S: Final = 5.0  # HA discovery / update progress re-sent after a reconnect


class KioskApp:
    """One kiosk. ``start()``/``stop()``, or ``run()`` which blocks until stopped (signal, EOF, time)."""

    def __init__(
        self,
        cfg: KioskConfig,
        *,
        embedder: object | None = None,
        transport: Transport | None = None,
        synthetic: Callable[[], Iterator[Image]] | None = None,
        app_version: str = __version__,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.kiosk.store_id, cfg.kiosk.kiosk_id)
        self.boot_id = uuid.uuid4().hex
        self.stop_event = threading.Event()  # the one stop event; set by signals, EOF or stop()
        self._app_version = app_version
        self._injected = embedder
        self._base_embedder: object | None = None  # the configured bundle's, when this app loaded it
        self._pair: ModelPair | None = None  # THE reference: (embedder, snapshot), replaced whole
        self._pair_lock = threading.Lock()  # writers only (sync and updater); readers take the reference
        self._released = False  # serving a pair from the updater (not the configured bundle)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._t_start = time.monotonic()
        self._state: tuple[KioskState, str | None] | None = None
        self._status_key: tuple[object, ...] | None = None  # what a status change is judged on
        self._since = utc_now_iso()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._camera_down = False
        self._status_lock = threading.Lock()
        self._keys = [load_public_key(p) for p in cfg.snapshots.public_keys]
        self._sources = Sources(cfg.sync.sources)  # where announcements and releases may point
        # Embedders no longer served: closed by the health loop after their grace period, once no open
        # item uses them; the rest at stop (they used to stay open until stop: memory per update).
        self._retired = RetiredModels(cfg.update.retired_close_s if cfg.update else 0.0)

        self.outbox = Outbox(cfg.outbox.path, max_rows=cfg.outbox.max_rows, max_age_s=cfg.outbox.max_age_s)
        inner = transport or make_transport(cfg.broker, cfg.kiosk.kiosk_id)
        self.transport = HookedTransport(inner, lambda: self.connect_tasks.on_connected())
        self.connect_tasks = ConnectTasks(self.transport, self.topics, app_version=app_version,
                                          health_interval_s=cfg.health.interval_s)
        self.comms = Comms(self.transport, self.outbox, self.topics, app_version=app_version)
        self.sync: SnapshotSync | None = None  # made in start() for the running model, remade on a switch
        # The last announcement seen on the snapshot topic (= the broker's retained one): handed to the sync
        # made at a model switch, which would otherwise see it only at the next reconnect.
        self._announcement: tuple[str, bytes] | None = None
        # The customer's answers on the screen -> feedback messages in the outbox (opt-in, [feedback]).
        self.feedback = FeedbackRecorder(cfg.feedback, self.topics, self.comms.publish_event,
                                         boot_id=self.boot_id)
        self.screen: ScreenServer | None = ScreenServer(
            cfg.screen, thumbs_dir=self._thumbs_dir, answer_timeout_s=cfg.feedback.answer_timeout_s,
            feedback_note=cfg.feedback.enabled, on_answer=self.feedback.on_answer,
        ) if cfg.screen.enabled else None
        cam = cfg.camera
        live = source_is_live(cam.source)
        drop = cam.overflow == "drop_oldest" or (cam.overflow == "auto" and live)
        frames: BoundedQueue[Frame] = BoundedQueue(
            cam.queue_size, OverflowPolicy.DROP_OLDEST if drop else OverflowPolicy.WAIT, "frames"
        )
        factory = open_source_factory(
            cam.source, open_timeout_ms=cam.open_timeout_ms, read_timeout_ms=cam.read_timeout_ms,
            width=cam.width, height=cam.height, fps=cam.fps, synthetic=synthetic or default_synthetic,
        )
        self.grab = GrabStage(
            factory, frames, stall_s=cam.stall_s, backoff_min_s=cam.backoff_min_s,
            backoff_max_s=cam.backoff_max_s, loop=cam.loop, on_state=self._on_camera_state,
        )
        det = cfg.detection
        self.pipeline = Pipeline.of_pairs(
            frames, HeldItemDetector(det), self._current_pair, on_result=self._on_result,
            on_frame=self._on_frame, aggregate_frames=det.aggregate_frames, top_k=det.top_k,
            max_inflight=cfg.model.max_inflight,
        )
        u = cfg.update
        self.probe = SwitchProbe(
            self.pipeline.counters, factor=u.probe_latency_factor if u else 2.0,
            slack_ms=u.probe_latency_slack_ms if u else 20.0,
        )
        settings = update_settings(cfg)
        self.updater: Updater | None = None if settings is None else Updater(
            settings, self.topics, self._keys, transport=self.transport, on_switch=self._on_switch_pair,
            on_alert=self._alert, probe=self.probe, retire=self._retired.retire,
            open_configured=self._open_configured, sources=self._sources,
        )
        self.jobs: JobsBridge | None = None

    @property
    def model_id(self) -> str:
        """The model serving now (empty before start)."""
        pair = self._pair
        return pair.model_id if pair is not None else ""

    @property
    def _snapshot(self) -> ActiveSnapshot | None:
        pair = self._pair
        return pair.snapshot if pair is not None else None

    def _current_pair(self) -> ModelPair:
        pair = self._pair
        assert pair is not None, "the pipeline runs only after start() loaded a model"
        return pair

    # -- construction helpers --
    def _new_sync(self, model_id: str, dim: int, *, configured: bool) -> SnapshotSync:
        state = sync_dir(self.cfg.snapshots.state_dir, model_id, configured=configured)
        return SnapshotSync(
            SnapshotStore(state), self._keys, store_id=self.cfg.kiosk.store_id, model_id=model_id,
            model_dim=dim, on_swap=self._on_swap, on_refused=self._on_refused, sources=self._sources,
        )

    # -- lifecycle --
    def start(self) -> None:
        """Start everything in dependency order; the kiosk serves even with no broker or no snapshot."""
        if self._started:
            raise RuntimeError("kiosk already started")
        self._started = True
        limit_blas_threads()
        if not self._sources:
            _LOGGER.warning("[sync] sources is empty: announced snapshots and releases will be refused "
                            "(source_not_allowed); serving only stored or [snapshots] initial snapshots")
        loaded = self.updater.boot() if self.updater is not None else None  # a released pair wins
        if loaded is not None:
            embedder, model_id, self._released = loaded.embedder, loaded.pair.model_id, True
        else:
            embedder = self._injected if self._injected is not None else make_embedder(self.cfg.model)
            self._base_embedder = embedder if self._injected is None else None
            model_id = str(getattr(embedder, "model_id"))  # noqa: B009 (port attribute)
        self.sync = self._new_sync(model_id, int(getattr(embedder, "dim")), configured=loaded is None)  # noqa: B009
        self._pair = ModelPair(as_async(embedder), None)
        stored = self.sync.load_active()
        if loaded is not None and (stored is None or stored.version < loaded.snapshot.version):
            stored = loaded.snapshot  # the release's snapshot, unless sync installed a newer one since
        self._pair = ModelPair(as_async(embedder), stored)
        if loaded is None:
            self._adopt_configured()  # the first update's last known good
        if stored is None and loaded is None and self.cfg.snapshots.initial is not None:
            try:
                self.sync.install(self.cfg.snapshots.initial)  # on_swap sets the pair's snapshot
            except SnapshotRefused as exc:
                _LOGGER.error("initial snapshot refused: %s", exc)
                self._on_refused(exc.reason, exc.detail)
        self.connect_tasks.set_model(model_id)
        if self.updater is not None:
            self.connect_tasks.extra.append(self.updater.republish)
        self.comms.start(self._status())
        self.sync.start()
        if self.cfg.snapshots.subscribe:
            self.comms.subscribe(self.topics.snapshot, self._on_announcement)
        for topic in HaDiscovery.subscriptions:
            self.comms.subscribe(topic, self.connect_tasks.on_message)
        if self.updater is not None:
            self.updater.listeners.append(self._on_update_progress)
            self.updater.start()
            self._start_jobs(self.updater)
        if self.screen is not None:
            self.screen.start()
        self.pipeline.start()
        for name, target in (("camera-grab", self.grab.run), ("kiosk-health", self._health_loop)):
            t = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
            self._threads.append(t)
            t.start()
        _LOGGER.info("kiosk %s/%s started (boot %s, model %s)", self.topics.store, self.topics.kiosk,
                     self.boot_id[:8], model_id[:12])

    def _start_jobs(self, updater: Updater) -> None:
        u, b = self.cfg.update, self.cfg.broker
        if u is None or not u.jobs or b.transport != "aws":
            return
        thing = u.thing_name or b.client_id or self.cfg.kiosk.kiosk_id
        self.jobs = JobsBridge(self.transport, thing, updater)
        self.jobs.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop in reverse order: camera, health, updater, pipeline, models, screen, sync, comms, outbox."""
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                _LOGGER.error("thread %s still alive after %.1f s", t.name, timeout_s)
        if self.jobs is not None:
            self.jobs.stop(timeout_s)
        if self.updater is not None:
            self.updater.stop(timeout_s)  # no switch from here on: the pointer stays as it is
        self.pipeline.stop(timeout_s)
        if self.updater is not None:
            self.updater.close_loaded()
        self._retired.close_all()  # each close bounded: a hung one must not hang the kiosk's stop
        if self._base_embedder is not None:
            close_embedder(self._base_embedder)
        self._base_embedder = None
        if self.screen is not None:
            self.screen.stop(timeout_s)
        if self.sync is not None:
            self.sync.stop(timeout_s)
        self.comms.stop(timeout_s)
        self.outbox.close()
        self._threads = []

    def run(self, *, max_seconds: float | None = None, exit_at_eof: bool = False) -> None:
        """Start, block until the stop event (or EOF / ``max_seconds``), then stop (also after a failed
        start: whatever had started is stopped before the error propagates)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        notifier = Notifier.from_env()  # systemd Type=notify + WatchdogSec (no-op outside systemd)
        try:
            self.start()
            notifier.ready(f"serving {self.topics.store}/{self.topics.kiosk}")
            while not self.stop_event.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if exit_at_eof and self.pipeline.done.is_set():
                    self._drain(_DRAIN_AT_EOF_S)
                    break
                retrying = self.grab.state in CAMERA_RETRYING
                notifier.tick(self.pipeline.counters.frames_processed, idle_ok=retrying)
                self.stop_event.wait(0.2)
        finally:
            notifier.stopping()
            self.stop()

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while ((self.comms.outbox_depth or self.comms.outbox_memory) and self.comms.connected
               and time.monotonic() < deadline):
            self.stop_event.wait(0.05)

    # -- callbacks --
    def _on_frame(self, frame: Frame, det: Detection) -> None:
        if self.screen is not None:
            self.screen.show_frame(frame.seq, frame.image, det.box, det.state.value)

    def _on_result(self, r: ItemResult) -> None:
        root = r.snapshot_dir  # the snapshot this item was searched in (a swap may have happened since)
        if "embed" in r.latency_ms:
            self.probe.on_result(r.model_id, r.latency_ms["embed"])
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
            model=r.model_id or self.model_id, snapshot=r.snapshot_version, latency_ms=r.latency_ms,
        )
        self.comms.publish_event(self.topics.match, event.to_bytes())
        _LOGGER.info("item %d: %s (%s, %.3f) v%d", r.item_id, "match" if r.matched else "no match",
                     items[0].sku if items else "-", items[0].score if items else 0.0, r.snapshot_version)
        if self.screen is not None:
            self.feedback.remember(event.id, r)  # references only; built when the customer answers
            self.screen.show_result(event.model_dump(mode="json"))

    def _on_camera_state(self, old: CameraState, new: CameraState) -> None:
        if new is CameraState.STOPPED and self.stop_event.is_set():
            return  # a deliberate stop: the camera is not lost, and the status says offline anyway
        if new not in HEALTHY and not self._camera_down:
            self._camera_down = True  # one alert per episode, however many reopen attempts it takes
            self._alert("camera_lost", f"camera {new.value}")
        elif new is CameraState.STREAMING and self._camera_down:
            self._camera_down = False
            self._alert("camera_back", f"streaming again after {self.grab.reopens} reopen(s)")
        self._refresh_status()

    def _on_swap(self, snap: ActiveSnapshot) -> None:
        """Snapshot sync installed ``snap``: same model, new snapshot (one reference replaced)."""
        with self._pair_lock:
            pair = self._pair
            if pair is None or snap.manifest.model_id != pair.model_id:
                _LOGGER.warning("snapshot v%d is for another model: ignored", snap.version)
                return
            old = pair.snapshot
            if old is not None and snap.version < old.version:
                _LOGGER.warning("snapshot v%d older than the served v%d: ignored", snap.version, old.version)
                return
            self._pair = replace(pair, snapshot=snap)  # the search stage picks it up at its next item
            if not self._released:
                self._adopt_configured()
        if old is not None and old.version != snap.version:
            self._alert("snapshot_applied", f"v{old.version} -> v{snap.version}")
        self._refresh_status()

    def _on_switch_pair(self, embedder: Any, snapshot: ActiveSnapshot) -> None:
        """The updater switched model and snapshot (or rolled back): both in one reference swap."""
        new = ModelPair(as_async(embedder), snapshot)
        active = self.updater.active if self.updater is not None else None
        configured = active is not None and active.pair.configured and active.embedder is embedder
        with self._pair_lock:
            old = self._pair
            self._pair = new
            self._released = not configured  # a rollback to the configured pair serves it as at boot
        old_model = old.model_id if old is not None else ""
        self.probe.on_switch(old_model, new.model_id)
        _LOGGER.info("model %s -> %s, snapshot v%d", old_model[:12], new.model_id[:12], snapshot.version)
        if new.model_id != old_model:
            self._replace_sync(new.model_id, int(embedder.dim), configured=configured)
            self.connect_tasks.set_model(new.model_id)  # HA shows the new model
        self._refresh_status()

    def _replace_sync(self, model_id: str, dim: int, *, configured: bool = False) -> None:
        """A snapshot is valid for one model: a new sync (its own state) follows the new model."""
        new = self._new_sync(model_id, dim, configured=configured)
        new.start()
        old, self.sync = self.sync, new
        last = self._announcement  # read after the swap: one arriving meanwhile reaches ``new`` itself
        if last is not None:
            new.on_announcement(last[0], last[1], True)  # as the broker re-delivers it on a subscribe
        if old is not None:
            old.stop()

    def _adopt_configured(self) -> None:
        """Tell the updater the configured pair serving now (with the pair lock held, or before start)."""
        pair = self._pair
        if self.updater is None or pair is None or pair.snapshot is None:
            return  # no snapshot yet: recorded when the sync installs the first one
        embedder = self._base_embedder if self._base_embedder is not None else self._injected
        if embedder is None:
            return
        self.updater.adopt(
            LoadedPair(configured_pair(pair.model_id, pair.snapshot.version), embedder, pair.snapshot)
        )

    def _open_configured(self, pair: Pair) -> LoadedPair:
        """The updater rolls back to the configured pair after a restart: load the configured model and the
        snapshot its sync keeps (the one it served when the update switched away from it)."""
        embedder = self._injected if self._injected is not None else self._base_embedder
        if embedder is None:
            embedder = self._base_embedder = make_embedder(self.cfg.model)
        model_id = str(getattr(embedder, "model_id"))  # noqa: B009 (port attribute)
        sync = self._new_sync(model_id, int(getattr(embedder, "dim")), configured=True)  # noqa: B009
        snap = sync.load_active()
        if snap is None:
            raise RuntimeError("the configured model has no stored snapshot")
        return LoadedPair(configured_pair(model_id, snap.version), embedder, snap)

    def _on_update_progress(self, p: UpdateProgress) -> None:
        if p.step == "done" and self._base_embedder is not None and self._released:
            self._retired.retire(self._base_embedder)  # the configured bundle serves no more
            self._base_embedder = None
        self._refresh_status()

    def _on_announcement(self, topic: str, payload: bytes, retained: bool) -> None:
        self._announcement = (topic, bytes(payload)) if payload else None  # empty: the retained one cleared
        sync = self.sync  # whichever sync follows the running model now
        if sync is not None:
            sync.on_announcement(topic, payload, retained)

    def _on_refused(self, reason: str, detail: str) -> None:
        self._alert("snapshot_refused", f"{reason}: {detail}"[:500])

    def _alert(self, kind: Any, detail: str) -> None:
        alert = Alert(kiosk=self.topics.kiosk, store=self.topics.store, kind=kind, detail=detail)
        try:
            self.comms.publish_event(self.topics.alert, alert.to_bytes())
        except Exception:
            _LOGGER.exception("could not queue %s alert", kind)

    def _thumbs_dir(self) -> Path | None:
        snap = self._snapshot
        return snap.directory if snap is not None else None

    # -- status and health --
    def _status(self) -> Status:
        cam = self.grab.state
        snap = self._snapshot
        state, reason = KioskState.ONLINE, None
        if self.updater is not None and not self.updater.idle.is_set():
            state, reason = KioskState.UPDATING, "model update"
        elif self.sync is not None and not self.sync.idle.is_set():
            state, reason = KioskState.UPDATING, "snapshot update"
        elif cam not in HEALTHY:
            state, reason = KioskState.DEGRADED, f"camera {cam.value}"
        elif snap is None:
            state, reason = KioskState.DEGRADED, "no snapshot"
        if self._state != (state, reason):
            self._state, self._since = (state, reason), utc_now_iso()
        return Status(
            kiosk=self.topics.kiosk, store=self.topics.store, state=state, reason=reason,
            app=self._app_version, model=self.model_id or None,
            snapshot=snap.version if snap else None, since=self._since, camera=cam.value,
        )

    def _refresh_status(self) -> None:
        with self._status_lock:
            before = self._status_key
            status = self._status()
            self._status_key = (status.state, status.reason, status.model, status.snapshot)
            changed = self._status_key != before
        if self._started and changed and not self.stop_event.is_set():
            _LOGGER.info("kiosk %s%s", status.state.value, f" ({status.reason})" if status.reason else "")
            self.comms.set_status(status)
        if self.screen is not None:
            self.screen.set_status(status=status.state.value, camera=status.camera, snapshot=status.snapshot,
                                   model=self.model_id[:12],
                                   broker="connected" if self.comms.connected else "offline")

    def health(self) -> Health:
        """The current health figures."""
        snap = self._snapshot
        return Health(
            kiosk=self.topics.kiosk, store=self.topics.store,
            uptime_s=round(time.monotonic() - self._t_start, 3), camera=self.grab.state.value,
            frames_in=self.grab.frames_in, frames_processed=self.pipeline.counters.frames_processed,
            frames_dropped=self.grab.frames_dropped, fps=round(self.pipeline.fps(), 2),
            latency_ms=self.pipeline.stats.percentiles(), model=self.model_id,
            snapshot=snap.version if snap else None, interval_s=self.cfg.health.interval_s,
        )

    def _health_loop(self, stop: threading.Event) -> None:
        interval_s = self.cfg.health.interval_s
        next_health = time.monotonic()
        while not stop.is_set():
            try:
                self.connect_tasks.run_pending()
                self._refresh_status()
                self._retired.close_due(in_use=self.pipeline.embedders_in_use())
                if time.monotonic() >= next_health:
                    next_health += interval_s
                    self.comms.publish_health(self.health())
            except Exception:
                _LOGGER.exception("health loop iteration failed")
            stop.wait(min(_STATUS_TICK_S, interval_s))

