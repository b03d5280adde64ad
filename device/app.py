"""The kiosk's composition root: builds every component from the config, starts them in dependency order
(comms, snapshots, screen, pipeline, camera, health) and stops them in reverse."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from device.camera.buffer import BoundedQueue, Frame, OverflowPolicy
from device.camera.grab import HEALTHY, CameraState, GrabStage
from device.camera.port import Image
from device.camera.sources import open_source_factory, source_is_live
from device.comms import Comms, InMemoryTransport, Outbox, Transport
from device.config import KioskConfig
from device.detect.detector import Detection, HeldItemDetector
from device.pipeline import ItemResult, Pipeline, as_async
from device.screen import ScreenServer
from device.sync import ActiveSnapshot, SnapshotRefused, SnapshotStore, SnapshotSync
from storelens import __version__
from storelens.protocol import Alert, Health, KioskState, MatchEvent, MatchItem, Status, Topics
from storelens.signing import load_public_key
from storelens.snapshot import utc_now_iso

_LOGGER = logging.getLogger(__name__)

_STATUS_TICK_S: Final = 0.5  # how often status is re-evaluated (camera, snapshot, updates)
_DRAIN_AT_EOF_S: Final = 10.0  # --exit-at-eof: wait this long for the outbox to empty before stopping


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
        self._owns_embedder = embedder is None
        self._embedder = embedder if embedder is not None else self._make_embedder()
        self.model_id: str = str(getattr(self._embedder, "model_id"))  # noqa: B009 (port attribute)
        model_dim = int(getattr(self._embedder, "dim"))  # noqa: B009
        self._snapshot: ActiveSnapshot | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._t_start = time.monotonic()
        self._state: tuple[KioskState, str | None] | None = None
        self._since = utc_now_iso()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._camera_down = False
        self._status_lock = threading.Lock()

        self.outbox = Outbox(cfg.outbox.path, max_rows=cfg.outbox.max_rows, max_age_s=cfg.outbox.max_age_s)
        self.comms = Comms(
            transport or self._make_transport(), self.outbox, self.topics, app_version=app_version
        )
        self.store = SnapshotStore(cfg.snapshots.state_dir)
        self.sync = SnapshotSync(
            self.store, [load_public_key(p) for p in cfg.snapshots.public_keys], store_id=cfg.kiosk.store_id,
            model_id=self.model_id, model_dim=model_dim, on_swap=self._on_swap, on_refused=self._on_refused,
        )
        self.screen: ScreenServer | None = (
            ScreenServer(cfg.screen, thumbs_dir=self._thumbs_dir) if cfg.screen.enabled else None
        )
        cam = cfg.camera
        live = source_is_live(cam.source)
        frames: BoundedQueue[Frame] = BoundedQueue(
            cam.queue_size, OverflowPolicy.DROP_OLDEST if live else OverflowPolicy.WAIT, "frames"
        )
        factory = open_source_factory(
            cam.source, open_timeout_ms=cam.open_timeout_ms, read_timeout_ms=cam.read_timeout_ms,
            width=cam.width, height=cam.height, fps=cam.fps, synthetic=synthetic or _default_synthetic,
        )
        self.grab = GrabStage(
            factory, frames, stall_s=cam.stall_s, backoff_min_s=cam.backoff_min_s,
            backoff_max_s=cam.backoff_max_s, loop=cam.loop, on_state=self._on_camera_state,
        )
        det = cfg.detection
        self.pipeline = Pipeline(
            frames, HeldItemDetector(det), as_async(self._embedder), lambda: self._snapshot,
            on_result=self._on_result, on_frame=self._on_frame, aggregate_frames=det.aggregate_frames,
            top_k=det.top_k, max_inflight=cfg.model.max_inflight,
        )

    # -- construction helpers --
    def _make_embedder(self) -> object:
        m = self.cfg.model
        if m.kind == "fake":
            from models.fake import FakeEmbedder

            return FakeEmbedder(m.fake_dim)
        from models.embedder import Embedder

        assert m.bundle is not None
        return Embedder(m.bundle, mode=m.mode, cache_dir=m.cache_dir)

    def _make_transport(self) -> Transport:
        b = self.cfg.broker
        client_id = b.client_id or self.cfg.kiosk.kiosk_id
        if b.transport == "none":
            return InMemoryTransport(online=False)
        if b.transport == "aws":
            from device.comms.aws_transport import AwsIotTransport

            assert b.endpoint and b.cert and b.key
            return AwsIotTransport(b.endpoint, 8883, client_id, b.cert, b.key, b.ca)
        from device.comms.paho_transport import PahoTransport

        return PahoTransport(
            b.url, client_id, username=b.username, password=b.password(),
            ca=str(b.ca) if b.ca else None, cert=str(b.cert) if b.cert else None,
            key=str(b.key) if b.key else None,
        )

    # -- lifecycle --
    def start(self) -> None:
        """Start everything in dependency order; the kiosk serves even with no broker or no snapshot."""
        if self._started:
            raise RuntimeError("kiosk already started")
        self._started = True
        self._snapshot = self.sync.load_active()
        if self._snapshot is None and self.cfg.snapshots.initial is not None:
            try:
                self.sync.install(self.cfg.snapshots.initial)  # on_swap sets self._snapshot
            except SnapshotRefused as exc:
                _LOGGER.error("initial snapshot refused: %s", exc)
                self._on_refused(exc.reason, exc.detail)
        self.comms.start(self._status())
        self.sync.start()
        if self.cfg.snapshots.subscribe:
            self.comms.subscribe(self.topics.snapshot, self.sync.on_announcement)
        if self.screen is not None:
            self.screen.start()
        self.pipeline.start()
        for name, target in (("camera-grab", self.grab.run), ("kiosk-health", self._health_loop)):
            t = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
            self._threads.append(t)
            t.start()
        _LOGGER.info("kiosk %s/%s started (boot %s)", self.topics.store, self.topics.kiosk, self.boot_id[:8])

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop in reverse order: camera, pipeline, embedder, health, screen, sync, comms, outbox."""
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                _LOGGER.error("thread %s still alive after %.1f s", t.name, timeout_s)
        self.pipeline.stop(timeout_s)
        if self._owns_embedder and hasattr(self._embedder, "close"):
            self._embedder.close()
        if self.screen is not None:
            self.screen.stop(timeout_s)
        self.sync.stop(timeout_s)
        self.comms.stop(timeout_s)
        self.outbox.close()
        self._threads = []

    def run(self, *, max_seconds: float | None = None, exit_at_eof: bool = False) -> None:
        """Start, block until the stop event (or EOF / ``max_seconds``), then stop."""
        self.start()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self.stop_event.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if exit_at_eof and self.pipeline.done.is_set():
                    self._drain(_DRAIN_AT_EOF_S)
                    break
                self.stop_event.wait(0.2)
        finally:
            self.stop()

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.comms.outbox_depth and self.comms.connected and time.monotonic() < deadline:
            self.stop_event.wait(0.05)

    # -- callbacks --
    def _on_frame(self, frame: Frame, det: Detection) -> None:
        if self.screen is not None:
            self.screen.show_frame(frame.seq, frame.image, det.box, det.state.value)

    def _on_result(self, r: ItemResult) -> None:
        snap = self._snapshot
        root = snap.directory if snap is not None else None
        items = [
            MatchItem(rank=i + 1, sku=h.sku, title=h.title, price=h.price, location=h.location,
                      score=round(h.score, 4), thumbnail=_relative(h.thumbnail, root))
            for i, h in enumerate(r.hits)
        ]
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        event = MatchEvent(
            kiosk=self.topics.kiosk, store=self.topics.store, seq=seq, boot_id=self.boot_id,
            matched=r.matched, results=items, threshold=r.threshold, frames=r.frames, model=self.model_id,
            snapshot=r.snapshot_version, latency_ms=r.latency_ms,
        )
        self.comms.publish_event(self.topics.match, event.to_bytes())
        _LOGGER.info("item %d: %s (%s, %.3f) v%d", r.item_id, "match" if r.matched else "no match",
                     items[0].sku if items else "-", items[0].score if items else 0.0, r.snapshot_version)
        if self.screen is not None:
            self.screen.show_result(event.model_dump(mode="json"))

    def _on_camera_state(self, old: CameraState, new: CameraState) -> None:
        if new not in HEALTHY and not self._camera_down:
            self._camera_down = True  # one alert per episode, however many reopen attempts it takes
            self._alert("camera_lost", f"camera {new.value}")
        elif new is CameraState.STREAMING and self._camera_down:
            self._camera_down = False
            self._alert("camera_back", f"streaming again after {self.grab.reopens} reopen(s)")
        self._refresh_status()

    def _on_swap(self, snap: ActiveSnapshot) -> None:
        old = self._snapshot
        self._snapshot = snap  # one reference: the search stage picks it up at its next item
        if old is not None and old.version != snap.version:
            self._alert("snapshot_applied", f"v{old.version} -> v{snap.version}")
        self._refresh_status()

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
        if not self.sync.idle.is_set():
            state, reason = KioskState.UPDATING, "snapshot update"
        elif cam not in HEALTHY:
            state, reason = KioskState.DEGRADED, f"camera {cam.value}"
        elif snap is None:
            state, reason = KioskState.DEGRADED, "no snapshot"
        if self._state != (state, reason):
            self._state, self._since = (state, reason), utc_now_iso()
        return Status(
            kiosk=self.topics.kiosk, store=self.topics.store, state=state, reason=reason,
            app=self._app_version, model=self.model_id, snapshot=snap.version if snap else None,
            since=self._since, camera=cam.value,
        )

    def _refresh_status(self) -> None:
        with self._status_lock:
            before = self._state
            status = self._status()
            changed = self._state != before
        if self._started and changed and not self.stop_event.is_set():
            _LOGGER.info("kiosk %s%s", status.state.value, f" ({status.reason})" if status.reason else "")
            self.comms.set_status(status)
        if self.screen is not None:
            self.screen.set_status(status=status.state.value, camera=status.camera, snapshot=status.snapshot,
                                   model=self.model_id[:12])

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
                self._refresh_status()
                if time.monotonic() >= next_health:
                    next_health += interval_s
                    self.comms.publish_health(self.health())
            except Exception:
                _LOGGER.exception("health loop iteration failed")
            stop.wait(min(_STATUS_TICK_S, interval_s))


def _relative(path: Path | None, root: Path | None) -> str | None:
    if path is None or root is None:
        return None
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return None


def _default_synthetic() -> Iterator[Image]:
    """The bench camera: rendered items held up in turn, forever."""
    from device.camera.synthetic import make_scene, render_items

    scene = make_scene(render_items(6))
    while True:
        yield from scene.frames()
