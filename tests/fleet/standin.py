"""An in-process kiosk stand-in: the real Updater, real Comms + PahoTransport + Outbox on a real broker, and a
frame loop (live-camera queue, drop-oldest) that embeds and searches with whatever pair is current.

A cheap in-process fleet; tests/fleet/test_fleet_real.py runs the same rollouts on real kiosk processes."""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from device.camera.buffer import BoundedQueue, OverflowPolicy
from device.comms import Comms, Outbox
from device.comms.paho_transport import PahoTransport
from device.config import UpdateConfig
from device.sync import Sources
from device.update import Updater
from storelens.protocol import Alert, KioskState, MatchEvent, MatchItem, Status, Topics
from tests.fleet.helpers import N_ITEMS, item_image

_LOGGER = logging.getLogger(__name__)


class StandInKiosk:
    def __init__(
        self,
        root: Path,
        store: str,
        kiosk: str,
        broker_url: str,
        public_key: Any,
        *,
        sources: Sources,
        fps: float = 10.0,
        probation_s: float = 0.3,
    ) -> None:
        self.topics = Topics(store, kiosk)
        self.transport = PahoTransport(broker_url, f"{store}-{kiosk}")
        self.outbox = Outbox(root / "outbox.sqlite")
        self.comms = Comms(self.transport, self.outbox, self.topics, app_version="test")
        self.updater = Updater(
            UpdateConfig(
                state_dir=root / "update", probation_s=probation_s, probe_interval_s=0.05,
                compile_timeout_s=120,
            ),
            self.topics,
            [public_key],
            transport=self.transport,
            on_switch=self._on_switch,
            on_alert=self._on_alert,
            probe=self._probe,
            sources=sources,
        )
        self.frames: BoundedQueue[np.ndarray] = BoundedQueue(16, OverflowPolicy.DROP_OLDEST, "frames")
        self._interval_s = 1.0 / fps
        self._pair: tuple[Any, Any] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.published = 0
        self.processed = 0
        self.errors = 0
        self.switches: list[str] = []
        self._errors_at_switch = 0

    @property
    def model_id(self) -> str | None:
        pair = self._pair
        return str(pair[0].model_id) if pair else None

    def start(self) -> None:
        loaded = self.updater.boot()
        if loaded is not None:
            self._pair = (loaded.embedder, loaded.snapshot)
        self.comms.start(self._status())
        self.updater.start()
        for name, target in (("standin-camera", self._camera), ("standin-search", self._search)):
            t = threading.Thread(target=target, name=f"{name}-{self.topics.kiosk}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5.0)
        self.updater.stop()
        self.comms.stop()
        self.outbox.close()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued event was acked by the broker."""
        end = threading.Event()
        self.comms.flush(timeout_s)
        for _ in range(int(timeout_s / 0.05)):
            if self.outbox.depth == 0:
                return True
            end.wait(0.05)
        return self.outbox.depth == 0

    # -- the kiosk app's side of the updater --
    def _on_switch(self, embedder: Any, snapshot: Any) -> None:
        self._pair = (embedder, snapshot)  # one reference: the search loop takes it at its next frame
        self._errors_at_switch = self.errors
        self.switches.append(str(embedder.model_id))
        self.comms.set_status(self._status())

    def _on_alert(self, kind: str, detail: str) -> None:
        alert = Alert(kiosk=self.topics.kiosk, store=self.topics.store, kind=kind, detail=detail)  # type: ignore[arg-type]
        self.comms.publish_event(self.topics.alert, alert.to_bytes())

    def _probe(self) -> str | None:
        grown = self.errors - self._errors_at_switch
        return f"{grown} frame errors since the switch" if grown else None

    def _status(self) -> Status:
        pair = self._pair
        return Status(
            kiosk=self.topics.kiosk,
            store=self.topics.store,
            state=KioskState.ONLINE,
            app="test",
            model=str(pair[0].model_id) if pair else None,
            snapshot=pair[1].version if pair else None,
        )

    # -- frames --
    def _camera(self) -> None:
        crops = [item_image(i, 1) for i in range(N_ITEMS)]
        for crop in itertools.cycle(crops):
            if self._stop.wait(self._interval_s):
                return
            self.frames.put(crop)

    def _search(self) -> None:
        seq = 0
        while not self._stop.is_set():
            crop = self.frames.get(timeout_s=0.1)
            if not isinstance(crop, np.ndarray):
                continue
            pair = self._pair
            self.processed += 1
            if pair is None:
                continue
            embedder, snap = pair
            try:
                hits = snap.search(embedder.embed_one(crop)[None, :], 3)[0]
            except Exception:
                _LOGGER.exception("frame failed")
                self.errors += 1
                continue
            if self.processed % 5:
                continue
            seq += 1
            event = MatchEvent(
                kiosk=self.topics.kiosk,
                store=self.topics.store,
                seq=seq,
                boot_id="standin",
                matched=bool(hits),
                results=[
                    MatchItem(rank=i + 1, sku=h.sku, score=round(h.score, 4)) for i, h in enumerate(hits)
                ],
                threshold=snap.threshold,
                frames=1,
                model=str(embedder.model_id),
                snapshot=snap.version,
            )
            self.comms.publish_event(self.topics.match, event.to_bytes())
            self.published += 1
