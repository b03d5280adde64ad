"""The switcher: the one place the kiosk changes which generation it serves.

A candidate (a verified generation placed in the store, from the release updater) goes through:
compile (a child process with limits) -> canaries (top-1, recorded vectors, the child's vectors, latency
against the model serving now) -> switch (pointer written in probation, then model and index swapped as one
reference between frames) -> probation (the probe watches the live pipeline) -> done (pointer stable, the
last good model retired) or rollback (the last good generation serves again, the candidate is retired).
Every step that changes what serves writes the pointer first, so a kiosk killed at any instant restarts on
the old generation or the new one. A snapshot-only candidate (the serving model's snapshot sync: same
model, new snapshot) goes through :func:`switch_snapshot`: load the new index, its canaries, pointer, swap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.config import UpdateConfig
from device.generations import canary
from device.generations.canary import UpdateFailed
from device.generations.child import CompileFailed, compile_in_child
from device.generations.loaded import (
    LoadedGeneration,
    Loader,
    close_embedder,
    default_loader,
    open_generation,
)
from device.generations.store import Generation, GenerationStore, Pointer, mark_failed, rollback
from device.sync.active import ActiveSnapshot
from device.sync.candidate import SnapshotCandidate
from device.sync.errors import SnapshotRefused
from models.port import EmbedderPort
from storelens.protocol import UpdateStep
from storelens.snapshot import SnapshotManifest

_LOGGER = logging.getLogger(__name__)

OnSwitch = Callable[[EmbedderPort, ActiveSnapshot], None]  # swap both references between frames
Probe = Callable[[], str | None]  # None: healthy; else the reason to roll back
# (release, step, ok, detail, generation serving or None): the updater's retained progress report
Report = Callable[[str, UpdateStep, bool, str, Generation | None], None]
LATENCY_SLACK_MS = 2.0  # absolute slack: sub-ms models would fail on scheduler noise alone


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A verified generation placed in the store, not yet serving."""

    generation: Generation
    manifest: SnapshotManifest  # its snapshot's verified manifest (canaries)


def pairing_refusal(
    candidate: SnapshotCandidate, model_id: str, served: ActiveSnapshot | None
) -> SnapshotRefused | None:
    """The pairing rule: a snapshot serves only the model that built it (``model_mismatch``), and never
    an older one than serves now (``version_replay``; a rollback to the previous one excepted)."""
    manifest = candidate.manifest
    if manifest.model_id != model_id:
        return SnapshotRefused(
            "model_mismatch", f"snapshot v{manifest.version} is for model {manifest.model_id[:12]}, "
            f"serving {model_id[:12]}"
        )
    if served is not None and manifest.version < served.version and not candidate.rollback:
        return SnapshotRefused(
            "version_replay", f"snapshot v{manifest.version} older than the served v{served.version}"
        )
    return None


def switch_snapshot(
    candidate: SnapshotCandidate,
    swap: Callable[[ActiveSnapshot], None],
    *,
    serving: Callable[[], tuple[str, ActiveSnapshot | None]] | None = None,
    lock: threading.Lock | None = None,
) -> ActiveSnapshot:
    """A snapshot-only switch: the pairing rule against ``serving()`` (model id, snapshot served), load the
    new index off the hot path and check its canaries (the release gate's own step), then, under ``lock``,
    the pairing rule again (a model switch may have happened meanwhile), commit the pointer and ``swap`` it
    in between frames. SnapshotRefused, nothing committed, when it cannot serve."""
    if serving is not None and (refusal := pairing_refusal(candidate, *serving())) is not None:
        raise refusal
    try:
        snap = canary.load_snapshot(candidate.directory, candidate.manifest)
    except UpdateFailed as exc:
        raise SnapshotRefused(exc.reason, exc.detail) from exc
    with lock if lock is not None else contextlib.nullcontext():
        if serving is not None and (refusal := pairing_refusal(candidate, *serving())) is not None:
            raise refusal
        candidate.commit()
        swap(snap)
    return snap


class Switcher:
    """Owns the pointer's writes and the loaded active / last good generations (``boot()`` first)."""

    def __init__(
        self,
        cfg: UpdateConfig,
        store: GenerationStore,
        keys: list[Ed25519PublicKey],
        *,
        on_switch: OnSwitch,
        report: Report,
        alert: Callable[[str, str], None],
        probe: Probe | None = None,
        cache_dir: Path | None = None,
        load_embedder: Loader = default_loader,
        retire: Callable[[EmbedderPort], None] = close_embedder,
        open_configured: Callable[[Generation], LoadedGeneration] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._keys = keys
        self._on_switch = on_switch
        self._report = report
        self._alert = alert
        self._probe = probe
        self._cache_dir = cache_dir
        self._load = load_embedder
        self._retire = retire  # an embedder no longer served (closed after a grace period)
        self.open_configured = open_configured  # generation 0, loaded again by the app (rollback)
        self._lock = threading.Lock()  # adopt() (any thread) vs the worker's pointer writes
        self.active: LoadedGeneration | None = None
        self.previous: LoadedGeneration | None = None  # last known good, loaded, while in probation

    # -- boot --
    def boot(self) -> LoadedGeneration | None:
        """Count a probation boot (crash loop -> roll back), load and re-verify the pointed generation;
        None when generation 0 serves (the app opens it and ``adopt()``s it) or none is recorded."""
        pointer, rolled = self.store.boot(self.cfg.max_probation_boots)
        if rolled:
            self._alert("rolled_back", "crash loop during probation: back to the previous pair")
        self.store.cleanup()
        for gen in (pointer.current, pointer.previous):
            if gen is None:
                continue
            loaded: LoadedGeneration | None = None
            if not gen.configured:
                try:
                    loaded = open_generation(self.store, self._keys, self._load, self._cache_dir, gen)
                except Exception:
                    _LOGGER.exception("stored generation %s unusable", gen.release)
                    continue
            if gen is pointer.previous:
                self.store.write(rollback(pointer))
                self._alert(
                    "rolled_back", f"stored pair {pointer.current and pointer.current.release} unusable"
                )
            self.active = loaded
            if rolled:
                failed = pointer.failed[-1] if pointer.failed else ""
                self._report(failed, "rolled_back", False, "crash loop during probation", None)
            return loaded
        return None

    def adopt(self, loaded: LoadedGeneration) -> None:
        """Generation 0 serves (nothing released at boot, or its sync installed a snapshot): record it as
        current, so the first update has a last known good. Ignored while a released generation serves."""
        if not loaded.generation.configured:
            raise ValueError("adopt() takes generation 0 only")
        with self._lock:
            if self.active is not None and not self.active.generation.configured:
                return
            self.active = loaded
            p = self.store.pointer
            if p.current != loaded.generation or p.previous is not None or p.state != "stable":
                # no cleanup here: a running update's placed generations are not in the pointer yet
                first = dataclasses.replace(p, current=loaded.generation, previous=None, state="stable")
                self.store.write(dataclasses.replace(first, probation_boots=0))

    # -- the gate --
    def gate(self, candidate: Candidate, staging: Path, *, timeout_s: float,
             check: Callable[[], None]) -> LoadedGeneration:
        """Compile in the child, load, run the canaries: the candidate loaded and warm, or UpdateFailed.
        ``check`` raises to abandon between steps (stop, superseded, deadline)."""
        gen, cfg = candidate.generation, self.cfg
        snap_dir = self.store.path(gen.snapshot)
        canaries = canary.canary_images(snap_dir, candidate.manifest)
        try:
            child = compile_in_child(
                self.store.path(gen.bundle), [p for _, p, _ in canaries],
                staging, timeout_s=min(cfg.compile_timeout_s, timeout_s),
                mem_bytes=cfg.compile_mem_bytes, cache_dir=self._cache_dir,
            )
        except CompileFailed as exc:
            raise UpdateFailed("compile", exc.reason, exc.detail) from exc
        if child.model_id != gen.model_id:
            raise UpdateFailed("compile", "model_mismatch", "child compiled another model")
        check()
        embedder = self._load(self.store.path(gen.bundle), self._cache_dir)  # warm: the canaries run it
        try:
            snap = canary.load_snapshot(snap_dir, candidate.manifest)
            new = LoadedGeneration(gen, embedder, snap)
            self._report(gen.release, "selftest", True, "", gen)
            crops = canary.selftest(embedder, snap, canaries, child.vectors,
                                    min_cosine=cfg.min_canary_cosine, decode=canary.default_decoder)
            self._check_latency(new, crops)
            check()
        except BaseException:
            self._retire(embedder)
            raise
        return new

    def _check_latency(self, new: LoadedGeneration, crops: list[canary.Crop]) -> None:
        old = self.active
        if old is None or old.generation.configured or not crops:
            return  # generation 0 may be a stand-in (fake) with no comparable latency
        old_ms, new_ms = canary.compare_latency(old.embedder, new.embedder, crops)
        new.latency_ms = new_ms
        budget_ms = old_ms * self.cfg.max_latency_factor + LATENCY_SLACK_MS
        if new_ms > budget_ms:
            raise UpdateFailed("selftest", "latency_regression", f"p50 {new_ms:.1f} ms vs {old_ms:.1f} ms")

    # -- switch, probation, rollback --
    def switch(self, new: LoadedGeneration) -> None:
        """Commit ``new`` in probation (pointer first), then swap model and index together."""
        with self._lock:
            p = self.store.pointer
            self.store.write(Pointer(current=new.generation, previous=p.current, state="probation",
                                     probation_boots=0, highest_sequence=new.generation.sequence,
                                     failed=p.failed))
            self.previous, self.active = self.active, new
        self._on_switch(new.embedder, new.snapshot)
        self._report(new.generation.release, "switch", True, "", new.generation)

    def probation(self, rel: str, stop: threading.Event, *, probation_s: float | None = None,
                  cancel: threading.Event | None = None) -> None:
        """Watch the probe for the window; then stable (last good retired) or rolled back. A stop leaves the
        pointer in probation (the next boot resumes it); ``cancel`` (a newer release) accepts it so far."""
        window_s = self.cfg.probation_s if probation_s is None else probation_s
        assert self.active is not None
        self._report(rel, "probation", True, "", self.active.generation)
        end = time.monotonic() + window_s
        reason: str | None = None
        while time.monotonic() < end and reason is None:
            if stop.wait(min(self.cfg.probe_interval_s, max(0.0, end - time.monotonic()))):
                return
            if cancel is not None and cancel.is_set():
                break
            reason = self._probe() if self._probe is not None else None
        if reason is not None:
            self.rollback(rel, reason)
            return
        self.store.write(dataclasses.replace(self.store.pointer, state="stable", probation_boots=0))
        if self.previous is not None:
            if not self.previous.generation.configured:  # the app retires generation 0's model itself
                self._retire(self.previous.embedder)
            self.previous = None
        self.store.cleanup()
        self._report(rel, "done", True, "", self.active.generation)

    def rollback(self, rel: str, reason: str) -> None:
        """Serve the last good generation again (pointer first), retire the one that failed probation."""
        p = self.store.pointer
        old, new = self.previous, self.active
        if old is None and p.previous is not None:  # probation resumed after a restart: load it now
            try:
                old = self._reopen(p.previous)
            except Exception:
                _LOGGER.exception("previous generation %s unusable", p.previous.release)
        if p.previous is None or old is None or new is None:
            self.store.write(dataclasses.replace(p, state="stable"))
            self.fail(rel, "failed", "unhealthy", f"probation: {reason} (no previous pair to go back to)")
            return
        back = rollback(p)
        if old.generation != p.previous:  # generation 0, reopened with the snapshot its sync serves now
            back = dataclasses.replace(back, current=old.generation)
        self.store.write(back)
        self.active, self.previous = old, None
        self._on_switch(old.embedder, old.snapshot)
        self._retire(new.embedder)
        self.store.cleanup()
        self._report(rel, "rolled_back", False, f"probation: {reason}", old.generation)
        self._alert("rolled_back", f"{rel}: {reason}")

    def _reopen(self, gen: Generation) -> LoadedGeneration:
        """Load a stored generation again: a released one from the store, generation 0 through the app."""
        if not gen.configured:
            return open_generation(self.store, self._keys, self._load, self._cache_dir, gen)
        if self.open_configured is None:
            raise RuntimeError("no way to open generation 0")
        loaded = self.open_configured(gen)
        if loaded.generation.model_id != gen.model_id:
            raise UpdateFailed("verify", "model_mismatch", "the configured model changed")
        return loaded

    def fail(self, rel: str, step: UpdateStep, reason: str, detail: str, *, remember: bool = True) -> None:
        """Report a candidate that will not serve; ``remember``: never try this release again here."""
        _LOGGER.error("update to %s %s (%s): %s", rel, step, reason, detail)
        if remember:
            with self._lock:  # adopt() may write the pointer from a sync thread meanwhile
                p = self.store.pointer
                self.store.write(dataclasses.replace(p, failed=mark_failed(p.failed, rel)))
        cur = self.active.generation if self.active else None
        self._report(rel, step, False, f"{reason}: {detail}"[:500], cur)
        kind = "rolled_back" if step == "rolled_back" else "update_failed"
        self._alert(kind, f"{rel}: {reason}: {detail}"[:500])

    def close_loaded(self) -> None:
        """After the worker stopped and nothing embeds any more: close the released models held here."""
        for loaded in (self.previous, self.active):
            if loaded is not None and not loaded.generation.configured:  # the app closes generation 0's
                close_embedder(loaded.embedder)
        self.previous = self.active = None
