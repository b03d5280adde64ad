"""The kiosk's composition root: builds every component from the config, starts them in dependency order
(what serves, comms, snapshot sync, updater, screen, pipeline, camera, health) and stops them in reverse.
What the kiosk reports (status, health, match events, alerts) is composed in ``device.app_report``.

What serves is ``device.generations``: the serving reference (model + snapshot, read once per held item),
the switcher (the one way a new generation serves) and its store. This module only wires them."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from device.app_build import default_synthetic, make_embedder, make_transport
from device.app_connect import ConnectTasks, HookedTransport
from device.app_report import Reporter
from device.camera.buffer import BoundedQueue, Frame, OverflowPolicy
from device.camera.grab import GrabStage
from device.camera.port import Image
from device.camera.sources import open_source_factory, source_is_live
from device.comms import Comms, Outbox, Transport
from device.config import KioskConfig
from device.detect.detector import Detection, HeldItemDetector
from device.feedback import FeedbackRecorder
from device.generations import RetiredModels
from device.generations.layout import open_store
from device.generations.probe import SwitchProbe
from device.generations.serving import Serving
from device.notify import CAMERA_RETRYING, Notifier
from device.pipeline import ItemResult, Pipeline, limit_blas_threads
from device.screen import ScreenServer
from device.sync import Sources
from device.update import JobsBridge, Updater
from models.port import EmbedderPort
from storelens import __version__
from storelens.ha_discovery import HaDiscovery
from storelens.protocol import Health, Topics, UpdateProgress
from storelens.signing import load_public_key

_LOGGER = logging.getLogger(__name__)

_DRAIN_AT_EOF_S: Final = 10.0  # --exit-at-eof: wait this long for the outbox to empty before stopping


class KioskApp:
    """One kiosk. ``start()``/``stop()``, or ``run()`` which blocks until stopped (signal, EOF, time)."""

    def __init__(
        self,
        cfg: KioskConfig,
        *,
        embedder: EmbedderPort | None = None,
        transport: Transport | None = None,
        synthetic: Callable[[], Iterator[Image]] | None = None,
        app_version: str = __version__,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.kiosk.store_id, cfg.kiosk.kiosk_id)
        self.boot_id = uuid.uuid4().hex
        self.stop_event = threading.Event()  # the one stop event; set by signals, EOF or stop()
        self._threads: list[threading.Thread] = []
        self._started = False
        keys = [load_public_key(p) for p in cfg.snapshots.public_keys]
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
            backoff_max_s=cam.backoff_max_s, loop=cam.loop,
            on_state=lambda old, new: self.report.on_camera_state(old, new),
        )
        det = cfg.detection
        self.pipeline = Pipeline.of_pairs(
            frames, HeldItemDetector(det), lambda: self.serving.current(), on_result=self._on_result,
            on_frame=self._on_frame, aggregate_frames=det.aggregate_frames,
            mirror_frame=det.mirror_one_frame, top_k=det.top_k,
            max_inflight=cfg.model.max_inflight, inline=cfg.model.pipeline == "inline",
        )
        u = cfg.update
        self.probe = SwitchProbe(
            self.pipeline.counters, factor=u.probe_latency_factor if u else 2.0,
            slack_ms=u.probe_latency_slack_ms if u else 20.0,
        )
        # The one generation store: [update] state_dir, else [snapshots] state_dir (old layout moved in).
        store = open_store(u.state_dir if u else cfg.snapshots.state_dir, legacy=cfg.snapshots.state_dir)
        self.serving = Serving(
            cfg.snapshots, keys, store=store, store_id=cfg.kiosk.store_id, sources=self._sources,
            make_configured=lambda: make_embedder(cfg.model), injected=embedder, retired=self._retired,
            probe=self.probe, on_refused=lambda r, d: self.report.on_refused(r, d),
            on_alert=lambda k, d: self.report.alert(k, d), on_model=self.connect_tasks.set_model,
            on_changed=lambda: self.report.refresh_status(),
        )
        self.updater: Updater | None = None if u is None else Updater(
            u, self.topics, keys, transport=self.transport, on_switch=self.serving.switch,
            on_alert=lambda k, d: self.report.alert(k, d), probe=self.probe, retire=self._retired.retire,
            open_configured=self.serving.open_configured, sources=self._sources,
            cache_dir=cfg.model.cache_dir, store=store,
        )
        if self.updater is not None:
            self.serving.switcher = self.updater.switcher
        self.jobs: JobsBridge | None = None
        self.report = Reporter(
            self.topics, boot_id=self.boot_id, app_version=app_version,
            health_interval_s=cfg.health.interval_s, comms=self.comms, grab=self.grab,
            pipeline=self.pipeline, serving=self.serving,
            updater=self.updater, screen=self.screen, feedback=self.feedback, stop_event=self.stop_event,
        )

    @property
    def model_id(self) -> str:
        """The model serving now (empty before start)."""
        return self.serving.model_id

    # -- lifecycle --
    def start(self) -> None:
        """Start everything in dependency order; the kiosk serves even with no broker or no snapshot."""
        if self._started:
            raise RuntimeError("kiosk already started")
        self._started = self.report.started = True
        limit_blas_threads()
        if not self._sources:
            _LOGGER.warning("[sync] sources is empty: announced snapshots and releases will be refused "
                            "(source_not_allowed); serving only stored or [snapshots] initial snapshots")
        model_id = self.serving.start()
        if self.updater is not None:
            self.connect_tasks.extra.append(self.updater.republish)
        self.comms.start(self.report.status())
        if self.cfg.snapshots.subscribe:
            self.comms.subscribe(self.topics.snapshot, self.serving.on_announcement)
        for topic in HaDiscovery.subscriptions:
            self.comms.subscribe(topic, self.connect_tasks.on_message)
        if self.updater is not None:
            self.updater.listeners.append(self._on_update_progress)
            self.updater.start()
            self._start_jobs(self.updater)
        if self.screen is not None:
            self.screen.start()
        self.pipeline.start()
        health = (self.stop_event, self.connect_tasks, self._retired)
        for name, target, args in (("camera-grab", self.grab.run, (self.stop_event,)),
                                   ("kiosk-health", self.report.health_loop, health)):
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
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
            self.updater.switcher.close_loaded()
        self._retired.close_all()  # each close bounded: a hung one must not hang the kiosk's stop
        if self.screen is not None:
            self.screen.stop(timeout_s)
        self.serving.stop(timeout_s)
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
                left = 0.2 if deadline is None else deadline - time.monotonic()
                self.stop_event.wait(min(0.2, max(0.0, left)))  # a --max-seconds run ends on time
        finally:
            notifier.stopping()
            self.stop()

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.comms.flush(timeout_s)  # the events handed in are in the outbox (or held) before we count
        while ((self.comms.outbox_depth or self.comms.outbox_memory) and self.comms.connected
               and time.monotonic() < deadline):
            self.stop_event.wait(0.05)

    # -- callbacks --
    def _on_frame(self, frame: Frame, det: Detection) -> None:
        self.report.on_frame(frame.t_capture, det)
        if self.screen is not None:
            self.screen.show_frame(frame.seq, frame.image, det.box, det.state.value)

    def _on_result(self, r: ItemResult) -> None:
        if "embed" in r.latency_ms:
            self.probe.on_result(r.model_id, r.latency_ms["embed"])
        self.report.on_result(r)

    def _on_update_progress(self, p: UpdateProgress) -> None:
        if p.step == "done":
            self.serving.on_done()  # the configured bundle serves no more
        self.report.refresh_status()

    def _thumbs_dir(self) -> Path | None:
        snap = self.serving.snapshot
        return snap.directory if snap is not None else None

    def health(self) -> Health:
        """The current health figures."""
        return self.report.health()
