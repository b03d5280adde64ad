"""The release updater: a desired release in, a verified candidate generation out, handed to the switcher.

Steps (each reported retained on Topics.update): download -> verify (signatures, sizes, hashes, the
snapshot against the NEW model) -> placed in the generation store as a candidate; then the switcher's
compile -> selftest -> switch -> probation -> done, or failed / rolled_back. The updater never writes the
pointer nor swaps a model itself. A newer desired release, ``stop()``, or the update's deadline abandons
the running one at its next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.comms.port import Transport
from device.config import UpdateConfig
from device.generations import (
    Candidate,
    Generation,
    GenerationStore,
    LoadedGeneration,
    Switcher,
    UpdateFailed,
)
from device.generations.loaded import Loader, close_embedder, default_loader
from device.generations.switcher import OnSwitch, Probe
from device.sync.download import DownloadError, check_source
from device.sync.sources import Sources
from device.update import steps
from models.port import EmbedderPort
from storelens.protocol import DesiredRelease, ProtocolError, Topics, UpdateProgress, UpdateStep, decode

_LOGGER = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0


class _Abandon(Exception):
    pass


class Updater:
    """Applies desired releases one at a time on its own thread; ``boot()`` first, then ``start()``."""

    def __init__(
        self,
        cfg: UpdateConfig,
        topics: Topics,
        public_keys: list[Ed25519PublicKey],
        *,
        transport: Transport | None,
        on_switch: OnSwitch,
        on_alert: Callable[[str, str], None] | None = None,
        probe: Probe | None = None,
        load_embedder: Loader = default_loader,
        retire: Callable[[EmbedderPort], None] = close_embedder,
        open_configured: Callable[[Generation], LoadedGeneration] | None = None,
        sources: Sources,
        cache_dir: Path | None = None,
        store: GenerationStore | None = None,
    ) -> None:
        if not public_keys:
            raise ValueError("at least one pinned public key is required")
        self.cfg = cfg
        self.topics = topics
        self.sources = sources  # where release.json, its signature and its artifacts may come from
        self._keys = list(public_keys)
        self._transport = transport
        self._on_alert = on_alert
        self.store = store if store is not None else GenerationStore(cfg.state_dir)  # the kiosk's one
        self.switcher = Switcher(
            cfg, self.store, self._keys, on_switch=on_switch, report=self._progress, alert=self._alert,
            probe=probe, cache_dir=cache_dir, load_embedder=load_embedder, retire=retire,
            open_configured=open_configured,
        )
        self._cond = threading.Condition()
        self._pending: DesiredRelease | None = None
        self._cancel = threading.Event()  # set: the running update is superseded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: UpdateProgress | None = None
        self.listeners: list[Callable[[UpdateProgress], None]] = []
        self.idle = threading.Event()
        self.idle.set()

    @property
    def active(self) -> LoadedGeneration | None:
        """The generation serving now, when the switcher loaded it (None: generation 0 before adopt)."""
        return self.switcher.active

    # -- lifecycle --
    def boot(self) -> LoadedGeneration | None:
        """The switcher's boot: the stored generation to serve (None: generation 0)."""
        return self.switcher.boot()

    def start(self, *, subscribe: bool = True) -> None:
        """Start the worker; subscribe to the kiosk's desired topic; resume a probation left running."""
        if self._thread is not None:
            raise RuntimeError("Updater already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="updater", daemon=True)
        self._thread.start()
        if subscribe and self._transport is not None:
            self._transport.subscribe(self.topics.desired, self.on_desired)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abandon any running step (the pointer is untouched) and join the worker."""
        self._stop.set()
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOGGER.error("updater thread still alive after %.1f s", timeout_s)
            self._thread = None

    # -- input --
    def on_desired(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT callback for the retained desired release: parse and hand to the worker (latest wins)."""
        if not payload:
            return
        try:
            desired = self.accept_desired(payload)
        except UpdateFailed as exc:
            _LOGGER.warning("desired release on %s refused (%s): %s", topic, exc.reason, exc.detail)
            self._alert("update_failed", f"desired release refused: {exc.reason}: {exc.detail}"[:500])
            return
        self.submit(desired)

    def accept_desired(self, payload: bytes) -> DesiredRelease:
        """Parse a desired-release payload and check it is for this kiosk (``check_desired``);
        UpdateFailed with a named reason (``bad_desired``, ``unsupported_schema``, ``wrong_store``...)."""
        try:
            desired = decode(payload, DesiredRelease)
        except ProtocolError as exc:
            reason = "unsupported_schema" if exc.reason == "unsupported_schema" else "bad_desired"
            raise UpdateFailed("verify", reason, str(exc)[:300]) from exc
        self.check_desired(desired)
        return desired

    def check_desired(self, desired: DesiredRelease) -> None:
        """UpdateFailed unless ``desired`` names this kiosk and store and its URLs lie under the sources."""
        t = self.topics
        if desired.store != t.store:
            raise UpdateFailed("verify", "wrong_store", f"desired release for store {desired.store!r}")
        if desired.kiosk != t.kiosk:
            raise UpdateFailed("verify", "wrong_kiosk", f"desired release for kiosk {desired.kiosk!r}")
        for url in (desired.url, desired.sig_url):
            try:
                check_source(self.sources, url)
            except DownloadError as exc:
                raise UpdateFailed("download", exc.reason, exc.detail) from exc

    def submit(self, desired: DesiredRelease) -> None:
        """Queue ``desired`` (never blocks: safe on a transport thread); a running update is abandoned."""
        with self._cond:
            self._pending = desired
            self.idle.clear()
            cur = self.store.pointer.current
            if cur is None or cur.release != desired.release:
                self._cancel.set()  # the same release again (retained re-delivery) does not restart it
            self._cond.notify_all()

    def _skip(self, desired: DesiredRelease) -> bool:
        """True (and reported) when ``desired`` is already running here or failed here before."""
        p = self.store.pointer
        cur = p.current
        if cur is not None and cur.release == desired.release:
            if p.state == "stable":
                self._progress(desired.release, "done", True, "already running this release", None)
            return True
        if desired.release in p.failed:
            self._progress(desired.release, "failed", False, "this release failed here before", None)
            return True
        return False

    # -- worker --
    def run(self, stop: threading.Event) -> None:
        """Worker loop: resume probation if the pointer says so, then apply desired releases in turn."""
        active = self.switcher.active
        if self.store.pointer.state == "probation" and active is not None:
            self.switcher.probation(active.generation.release, stop, cancel=self._cancel)
        while not stop.is_set():
            with self._cond:
                while self._pending is None and not stop.is_set():
                    self.idle.set()
                    self._cond.wait(1.0)
                desired, self._pending = self._pending, None
                self._cancel.clear()
            if desired is None or self._skip(desired):
                continue
            try:
                self._apply(desired, stop)
            except Exception:
                _LOGGER.exception("update to %s crashed", desired.release)
                self.switcher.fail(desired.release, "failed", "internal", "unexpected error (see kiosk log)")

    def _check(self, deadline: float, stop: threading.Event) -> None:
        if stop.is_set():
            raise _Abandon("kiosk stopping")
        if self._cancel.is_set():
            raise _Abandon("superseded by a newer release")
        if time.monotonic() > deadline:
            raise _Abandon("deadline passed")

    def _apply(self, desired: DesiredRelease, stop: threading.Event) -> None:
        deadline = time.monotonic() + desired.deadline_s
        rel = desired.release
        staging = self.store.new_staging(f"r-{rel}")
        try:
            candidate = self._candidate(desired, staging, deadline, stop)
            self._check(deadline, stop)
            new = self.switcher.gate(candidate, staging, timeout_s=max(1.0, deadline - time.monotonic()),
                                     check=lambda: self._check(deadline, stop))
            self.switcher.switch(new)
        except UpdateFailed as exc:
            step: UpdateStep = "rolled_back" if exc.step == "selftest" else "failed"
            self.switcher.fail(rel, step, exc.reason, f"{exc.step}: {exc.detail}")
            return
        except _Abandon as exc:
            self.switcher.fail(rel, "failed", "abandoned", str(exc), remember=str(exc) == "deadline passed")
            return
        finally:
            steps.discard(staging)
            active = self.switcher.active
            if active is None or active.generation.release != rel:
                self.store.cleanup()
        self.switcher.probation(rel, stop, probation_s=desired.probation_s, cancel=self._cancel)

    def _candidate(
        self, desired: DesiredRelease, staging: Path, deadline: float, stop: threading.Event
    ) -> Candidate:
        """Download and verify the release, place its bundle and snapshot: the candidate generation."""
        rel = desired.release
        self._progress(rel, "download", True, "", None)
        release = steps.fetch_release(desired, self._keys, timeout_s=desired.deadline_s, sources=self.sources)
        if release.sequence <= self.store.pointer.highest_sequence:
            highest = self.store.pointer.highest_sequence
            raise UpdateFailed("verify", "version_replay", f"sequence {release.sequence} <= {highest}")
        bundle_dir, archive, ref = steps.download(
            release, self.topics.store, staging, deadline=deadline, stop=self._cancel, sources=self.sources
        )
        self._check(deadline, stop)
        self._progress(rel, "verify", True, "", None)
        staged = steps.verify_staged(release, self.topics.store, bundle_dir, archive, ref, self._keys,
                                     max_snapshot_bytes=self.cfg.max_snapshot_bytes)
        self._check(deadline, stop)
        b_rel = self.store.place(staged.bundle_dir, "bundles", staged.bundle.model_id[:16])
        s_rel = self.store.place(
            staged.snapshot_dir, "snapshots", f"v{staged.snapshot.version}-{staged.snapshot_sha256[:12]}"
        )
        gen = Generation(rel, b_rel, s_rel, staged.bundle.model_id, staged.snapshot.version, release.sequence)
        self._progress(rel, "compile", True, "", gen)
        return Candidate(gen, staged.snapshot)

    # -- reporting --
    def _progress(self, rel: str, step: UpdateStep, ok: bool, detail: str, gen: Generation | None) -> None:
        active = self.switcher.active
        if gen is None and active is not None:
            gen = active.generation
        msg = UpdateProgress(
            kiosk=self.topics.kiosk,
            store=self.topics.store,
            release=rel,
            step=step,
            ok=ok,
            detail=detail,
            model=gen.model_id if gen else None,
            snapshot=gen.snapshot_version if gen else None,
        )
        self.last = msg
        _LOGGER.info("update %s: %s%s", rel, step, f" ({detail})" if detail else "")
        if self._transport is not None and not self._transport.publish(
            self.topics.update, msg.to_bytes(), qos=1, retain=True, timeout_s=PUBLISH_TIMEOUT_S
        ):
            _LOGGER.warning("update progress %s/%s not acknowledged", rel, step)
        for cb in list(self.listeners):
            try:
                cb(msg)
            except Exception:
                _LOGGER.exception("update listener failed")

    def republish(self) -> None:
        """Send the last progress again (after a reconnect)."""
        if self.last is not None and self._transport is not None:
            self._transport.publish(
                self.topics.update, self.last.to_bytes(), qos=1, retain=True, timeout_s=PUBLISH_TIMEOUT_S
            )

    def _alert(self, kind: str, detail: str) -> None:
        if self._on_alert is not None:
            try:
                self._on_alert(kind, detail)
            except Exception:
                _LOGGER.exception("alert callback failed")
