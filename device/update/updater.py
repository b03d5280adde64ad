"""The kiosk's model+snapshot updater: desired release in, verified pair switched in between frames.

Steps (each reported retained on Topics.update): download -> verify -> compile (child process, limits) ->
selftest -> switch -> probation -> done, or failed / rolled_back. The pointer file is the commit point;
the last known good pair stays loaded until probation ends, so a rollback is one reference swap.
A newer desired release, ``stop()``, or the update's deadline abandons the running one at its next step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.comms.port import Transport
from device.sync.active import ActiveSnapshot
from device.sync.download import DownloadError, check_source
from device.sync.sources import Sources
from device.update import steps
from device.update.child import CompileFailed, compile_in_child
from device.update.pairs import (
    LoadedPair,
    UpdateSettings,
    close_embedder,
    default_decoder,
    default_loader,
    open_pair,
)
from device.update.pointer import Pair, PairStore, Pointer, mark_failed, rollback
from storelens.protocol import DesiredRelease, ProtocolError, Topics, UpdateProgress, decode

_LOGGER = logging.getLogger(__name__)

Step = Literal[
    "idle",
    "download",
    "verify",
    "compile",
    "selftest",
    "switch",
    "probation",
    "done",
    "rolled_back",
    "failed",
]
OnSwitch = Callable[[Any, ActiveSnapshot], None]
Probe = Callable[[], str | None]  # None: healthy; else the reason to roll back
PUBLISH_TIMEOUT_S = 5.0
LATENCY_SLACK_MS = 2.0  # absolute slack: sub-ms models would fail on scheduler noise alone


class _Abandon(Exception):
    pass


class Updater:
    """Applies desired releases one at a time on its own thread; ``boot()`` first, then ``start()``."""

    def __init__(
        self,
        settings: UpdateSettings,
        topics: Topics,
        public_keys: list[Ed25519PublicKey],
        *,
        transport: Transport | None,
        on_switch: OnSwitch,
        on_alert: Callable[[str, str], None] | None = None,
        probe: Probe | None = None,
        load_embedder: Callable[[Path, Path | None], Any] = default_loader,
        retire: Callable[[Any], None] = close_embedder,
        open_configured: Callable[[Pair], LoadedPair] | None = None,
        sources: Sources,
    ) -> None:
        if not public_keys:
            raise ValueError("at least one pinned public key is required")
        self.settings = settings
        self.topics = topics
        self.sources = sources  # where release.json, its signature and its artifacts may come from
        self._keys = list(public_keys)
        self._transport = transport
        self._on_switch = on_switch
        self._on_alert = on_alert
        self._probe = probe
        self._load = load_embedder
        self._retire = retire  # an embedder no longer served (the app closes it after a grace period)
        self._open_configured = open_configured  # the app's configured pair, loaded again (rollback)
        self._active_lock = threading.Lock()  # adopt() (any thread) vs the worker's switch
        self.store = PairStore(settings.root)
        self._cond = threading.Condition()
        self._pending: DesiredRelease | None = None
        self._cancel = threading.Event()  # set: the running update is superseded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active: LoadedPair | None = None
        self._previous: LoadedPair | None = None  # last known good, loaded, while in probation
        self.last: UpdateProgress | None = None
        self.listeners: list[Callable[[UpdateProgress], None]] = []
        self.idle = threading.Event()
        self.idle.set()

    # -- lifecycle --
    def boot(self) -> LoadedPair | None:
        """Count a probation boot (crash loop -> roll back), load and re-verify the pointed pair."""
        pointer, rolled = self.store.boot(self.settings.max_probation_boots)
        if rolled:
            self._alert("rolled_back", "crash loop during probation: back to the previous pair")
        self.store.cleanup()
        for pair in (pointer.current, pointer.previous):
            if pair is None:
                continue
            loaded: LoadedPair | None = None  # the configured pair: the app opens it and adopt()s it
            if not pair.configured:
                try:
                    loaded = open_pair(self.store, self._keys, self._load, self.settings.cache_dir, pair)
                except Exception:
                    _LOGGER.exception("stored pair %s unusable", pair.release)
                    continue
            if pair is pointer.previous:
                self.store.write(rollback(pointer))
                self._alert(
                    "rolled_back", f"stored pair {pointer.current and pointer.current.release} unusable"
                )
            self.active = loaded
            if rolled:
                self._report(
                    pointer.failed[-1] if pointer.failed else "",
                    "rolled_back",
                    ok=False,
                    detail="crash loop during probation",
                )
            return loaded
        return None

    def adopt(self, loaded: LoadedPair) -> None:
        """The app serves its configured pair (no released pair at boot, or its sync installed a snapshot):
        record it in the pointer as the pair in use, so the first update has a last known good to roll back
        to. Ignored while a released pair is active."""
        if not loaded.pair.configured:
            raise ValueError("adopt() takes the configured pair only")
        with self._active_lock:
            if self.active is not None and not self.active.pair.configured:
                return
            self.active = loaded
            p = self.store.pointer
            if p.current != loaded.pair or p.previous is not None or p.state != "stable":
                # no cleanup here: a running update's placed generations are not in the pointer yet
                first = dataclasses.replace(p, current=loaded.pair, previous=None, state="stable")
                self.store.write(dataclasses.replace(first, probation_boots=0))

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

    def close_loaded(self) -> None:
        """After ``stop()`` and once nothing embeds any more: close the embedders this updater holds."""
        for loaded in (self._previous, self.active):
            if loaded is not None and not loaded.pair.configured:  # the app closes its configured model
                close_embedder(loaded.embedder)
        self._previous = self.active = None

    # -- input --
    def on_desired(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT callback for the retained desired release: parse and hand to the worker (latest wins)."""
        if not payload:
            return
        try:
            desired = self.accept_desired(payload)
        except steps.UpdateFailed as exc:
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
            raise steps.UpdateFailed("verify", reason, str(exc)[:300]) from exc
        self.check_desired(desired)
        return desired

    def check_desired(self, desired: DesiredRelease) -> None:
        """UpdateFailed unless ``desired`` names this kiosk and store and its URLs lie under the sources."""
        t = self.topics
        if desired.store != t.store:
            raise steps.UpdateFailed("verify", "wrong_store", f"desired release for store {desired.store!r}")
        if desired.kiosk != t.kiosk:
            raise steps.UpdateFailed("verify", "wrong_kiosk", f"desired release for kiosk {desired.kiosk!r}")
        for url in (desired.url, desired.sig_url):
            try:
                check_source(self.sources, url)
            except DownloadError as exc:
                raise steps.UpdateFailed("download", exc.reason, exc.detail) from exc

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
                self._report(desired.release, "done", detail="already running this release")
            return True
        if desired.release in p.failed:
            self._report(desired.release, "failed", ok=False, detail="this release failed here before")
            return True
        return False

    # -- worker --
    def run(self, stop: threading.Event) -> None:
        """Worker loop: resume probation if the pointer says so, then apply desired releases in turn."""
        if self.store.pointer.state == "probation" and self.active is not None:
            self._probation(self.active.pair.release, stop)
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
                self._fail(desired.release, "failed", "internal", "unexpected error (see kiosk log)")

    def _check(self, deadline: float, stop: threading.Event) -> None:
        if stop.is_set():
            raise _Abandon("kiosk stopping")
        if self._cancel.is_set():
            raise _Abandon("superseded by a newer release")
        if time.monotonic() > deadline:
            raise _Abandon("deadline passed")

    def _apply(self, desired: DesiredRelease, stop: threading.Event) -> None:
        s = self.settings
        deadline = time.monotonic() + desired.deadline_s
        rel = desired.release
        staging = self.store.new_staging(f"r-{rel}")
        new: LoadedPair | None = None
        try:
            self._report(rel, "download")
            release = steps.fetch_release(
                desired, self._keys, timeout_s=desired.deadline_s, sources=self.sources
            )
            if release.sequence <= self.store.pointer.highest_sequence:
                raise steps.UpdateFailed(
                    "verify",
                    "version_replay",
                    f"sequence {release.sequence} <= {self.store.pointer.highest_sequence}",
                )
            bundle_dir, archive, ref = steps.download(
                release, self.topics.store, staging, deadline=deadline, stop=self._cancel,
                sources=self.sources,
            )
            self._check(deadline, stop)
            self._report(rel, "verify")
            staged = steps.verify_staged(
                release,
                self.topics.store,
                bundle_dir,
                archive,
                ref,
                self._keys,
                max_snapshot_bytes=s.max_snapshot_bytes,
            )
            self._check(deadline, stop)
            self._report(rel, "compile", model=staged.bundle.model_id)
            b_rel = self.store.place(staged.bundle_dir, "bundles", staged.bundle.model_id[:16])
            s_rel = self.store.place(
                staged.snapshot_dir, "snapshots", f"v{staged.snapshot.version}-{staged.snapshot_sha256[:12]}"
            )
            pair = Pair(rel, b_rel, s_rel, staged.bundle.model_id, staged.snapshot.version, release.sequence)
            canaries = steps.canary_images(self.store.path(s_rel), staged.snapshot)
            try:
                child = compile_in_child(
                    self.store.path(b_rel),
                    [p for _, p, _ in canaries],
                    staging,
                    timeout_s=min(s.compile_timeout_s, max(1.0, deadline - time.monotonic())),
                    mem_bytes=s.compile_mem_bytes,
                    cache_dir=s.cache_dir,
                )
            except CompileFailed as exc:
                raise steps.UpdateFailed("compile", exc.reason, exc.detail) from exc
            if child.model_id != pair.model_id:
                raise steps.UpdateFailed("compile", "model_mismatch", "child compiled another model")
            self._check(deadline, stop)
            embedder = self._load(self.store.path(b_rel), s.cache_dir)  # warm: the self-test runs it
            snap = steps.load_snapshot(self.store.path(s_rel), staged.snapshot)
            new = LoadedPair(pair, embedder, snap)
            self._report(rel, "selftest", model=pair.model_id, snapshot=pair.snapshot_version)
            crops = steps.selftest(
                embedder,
                snap,
                canaries,
                child.vectors,
                min_cosine=s.min_canary_cosine,
                decode=default_decoder,
            )
            self._check_latency(new, crops)
            self._check(deadline, stop)
            self._switch(new)
            new = None  # owned by self.active now
        except steps.UpdateFailed as exc:
            step: Step = "rolled_back" if exc.step == "selftest" else "failed"
            self._fail(rel, step, exc.reason, f"{exc.step}: {exc.detail}")
            return
        except _Abandon as exc:
            self._fail(rel, "failed", "abandoned", str(exc), remember=str(exc) == "deadline passed")
            return
        finally:
            # not switched to, or the switch failed before the pair became active: never retire what serves
            if new is not None and (self.active is None or self.active.embedder is not new.embedder):
                self._retire(new.embedder)
            steps.discard(staging)
            if self.active is None or self.active.pair.release != rel:
                self.store.cleanup()
        self._probation(rel, stop, probation_s=desired.probation_s)

    def _check_latency(self, new: LoadedPair, crops: list[Any]) -> None:
        old = self.active
        if old is None or old.pair.configured or not crops:
            return  # the configured model may be a stand-in (fake) with no comparable latency
        old_ms, new_ms = steps.compare_latency(old.embedder, new.embedder, crops)
        new.latency_ms = new_ms
        budget_ms = old_ms * self.settings.max_latency_factor + LATENCY_SLACK_MS
        if new_ms > budget_ms:
            raise steps.UpdateFailed(
                "selftest", "latency_regression", f"p50 {new_ms:.1f} ms vs {old_ms:.1f} ms"
            )

    def _switch(self, new: LoadedPair) -> None:
        with self._active_lock:
            p = self.store.pointer
            self.store.write(
                Pointer(
                    current=new.pair,
                    previous=p.current,
                    state="probation",
                    probation_boots=0,
                    highest_sequence=new.pair.sequence,
                    failed=p.failed,
                )
            )
            self._previous, self.active = self.active, new
        self._on_switch(new.embedder, new.snapshot)  # the app swaps both references between frames
        self._report(new.pair.release, "switch", model=new.pair.model_id, snapshot=new.pair.snapshot_version)

    def _probation(self, rel: str, stop: threading.Event, probation_s: float | None = None) -> None:
        window_s = self.settings.probation_s if probation_s is None else probation_s
        assert self.active is not None
        self._report(
            rel, "probation", model=self.active.pair.model_id, snapshot=self.active.pair.snapshot_version
        )
        end = time.monotonic() + window_s
        reason: str | None = None
        while time.monotonic() < end and reason is None:
            if stop.wait(min(self.settings.probe_interval_s, max(0.0, end - time.monotonic()))):
                return  # stopping: the pointer stays in probation; the next boot resumes it
            if self._cancel.is_set():
                break  # a newer release: accept this one as good so far and move on
            reason = self._probe() if self._probe is not None else None
        if reason is not None:
            self._rollback(rel, reason)
            return
        p = self.store.pointer
        self.store.write(dataclasses.replace(p, state="stable", probation_boots=0))
        if self._previous is not None:
            if not self._previous.pair.configured:  # the app retires its configured model itself
                self._retire(self._previous.embedder)
            self._previous = None
        self.store.cleanup()
        self._report(rel, "done", model=self.active.pair.model_id, snapshot=self.active.pair.snapshot_version)

    def _rollback(self, rel: str, reason: str) -> None:
        p = self.store.pointer
        old, new = self._previous, self.active
        if old is None and p.previous is not None:  # probation resumed after a restart: load it now
            try:
                old = self._reopen(p.previous)
            except Exception:
                _LOGGER.exception("previous pair %s unusable", p.previous.release)
        if p.previous is None or old is None or new is None:
            self.store.write(dataclasses.replace(p, state="stable"))
            self._fail(rel, "failed", "unhealthy", f"probation: {reason} (no previous pair to go back to)")
            return
        back = rollback(p)
        if old.pair != p.previous:  # the configured pair, reopened with the snapshot its sync serves now
            back = dataclasses.replace(back, current=old.pair)
        self.store.write(back)
        self.active, self._previous = old, None
        self._on_switch(old.embedder, old.snapshot)
        self._retire(new.embedder)
        self.store.cleanup()
        self._report(
            rel,
            "rolled_back",
            ok=False,
            detail=f"probation: {reason}",
            model=old.pair.model_id,
            snapshot=old.pair.snapshot_version,
        )
        self._alert("rolled_back", f"{rel}: {reason}")

    def _reopen(self, pair: Pair) -> LoadedPair:
        """Load a stored pair again: a released one from the store, the configured one through the app."""
        if not pair.configured:
            return open_pair(self.store, self._keys, self._load, self.settings.cache_dir, pair)
        if self._open_configured is None:
            raise RuntimeError("no way to open the configured pair")
        loaded = self._open_configured(pair)
        if loaded.pair.model_id != pair.model_id:
            raise steps.UpdateFailed("verify", "model_mismatch", "the configured model changed")
        return loaded

    def _fail(self, rel: str, step: Step, reason: str, detail: str, *, remember: bool = True) -> None:
        _LOGGER.error("update to %s %s (%s): %s", rel, step, reason, detail)
        if remember:
            with self._active_lock:  # adopt() may write the pointer from a sync thread meanwhile
                p = self.store.pointer
                self.store.write(dataclasses.replace(p, failed=mark_failed(p.failed, rel)))
        cur = self.active.pair if self.active else None
        self._report(
            rel,
            step,
            ok=False,
            detail=f"{reason}: {detail}"[:500],
            model=cur.model_id if cur else None,
            snapshot=cur.snapshot_version if cur else None,
        )
        self._alert(
            "rolled_back" if step == "rolled_back" else "update_failed", f"{rel}: {reason}: {detail}"[:500]
        )

    # -- reporting --
    def _report(
        self,
        rel: str,
        step: Step,
        *,
        ok: bool = True,
        detail: str = "",
        model: str | None = None,
        snapshot: int | None = None,
    ) -> None:
        if model is None and self.active is not None:
            model, snapshot = self.active.pair.model_id, self.active.pair.snapshot_version
        msg = UpdateProgress(
            kiosk=self.topics.kiosk,
            store=self.topics.store,
            release=rel,
            step=step,
            ok=ok,
            detail=detail,
            model=model,
            snapshot=snapshot,
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
