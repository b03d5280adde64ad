"""Updater on one kiosk (in-memory transport): steps, verification, self-test, probation, rollback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device.comms import InMemoryTransport
from device.config import UpdateConfig
from device.generations import GenerationStore
from device.generations.child import CompileFailed, compile_in_child
from device.sync import Sources
from device.update import Updater
from storelens.protocol import Topics, UpdateProgress, decode
from tests.fleet.conftest import Releases
from tests.fleet.helpers import desired

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 60.0


class Kiosk:
    """An Updater with the callbacks a kiosk app would give it, recording what it was told."""

    def __init__(
        self,
        root: Path,
        releases: Releases,
        *,
        probation_s: float = 0.2,
        probe: Any = None,
        sources: Sources | None = None,
    ) -> None:
        self.transport = InMemoryTransport()
        self.transport.connect(will=None, timeout_s=1.0)
        self.topics = Topics("s1", "k1")
        self.switches: list[tuple[str, int]] = []
        self.alerts: list[tuple[str, str]] = []
        self.updater = Updater(
            UpdateConfig(
                state_dir=root, probation_s=probation_s, probe_interval_s=0.02, compile_timeout_s=60
            ),
            self.topics,
            [releases.key.public_key()],
            transport=self.transport,
            on_switch=lambda emb, snap: self.switches.append((emb.model_id, snap.version)),
            on_alert=lambda kind, detail: self.alerts.append((kind, detail)),
            probe=probe,
            sources=sources or Sources([releases.root.as_uri() + "/", root.parent.as_uri() + "/"]),
        )

    def progress(self) -> list[UpdateProgress]:
        return [decode(p, UpdateProgress) for p in self.transport.messages(self.topics.update)]

    def wait_step(self, release: str, steps: tuple[str, ...]) -> UpdateProgress:
        def done() -> bool:
            return any(p.release == release and p.step in steps for p in self.progress())

        assert self.transport.wait_for(done, WAIT_S), [(p.release, p.step, p.detail) for p in self.progress()]
        if steps[0] in ("done", "failed", "rolled_back"):
            assert self.updater.idle.wait(WAIT_S)  # the worker has finished cleaning up
        return next(p for p in self.progress() if p.release == release and p.step in steps)


@pytest.fixture
def kiosk(tmp_path: Path, releases: Releases) -> Iterator[Kiosk]:
    k = Kiosk(tmp_path / "k", releases)
    k.updater.boot()
    k.updater.start()
    yield k
    k.updater.stop()


def test_good_release_goes_through_every_step_and_commits(kiosk: Kiosk, releases: Releases) -> None:
    """A verified release must report each step in order, switch once, and leave a stable pointer."""
    rel = releases.good1
    kiosk.updater.submit(desired(rel, "s1", "k1"))
    final = kiosk.wait_step("rel10", ("done", "failed", "rolled_back"))
    assert final.step == "done", final.detail
    steps = [p.step for p in kiosk.progress() if p.release == "rel10"]
    assert steps == ["download", "verify", "compile", "selftest", "switch", "probation", "done"]
    assert kiosk.switches == [(rel.manifest.bundle.model_id, 10)]
    p = kiosk.updater.store.pointer
    assert p.state == "stable" and p.current is not None and p.current.release == "rel10"
    assert p.highest_sequence == 10
    retained = decode(kiosk.transport.retained[kiosk.topics.update], UpdateProgress)
    assert retained.step == "done" and retained.model == rel.manifest.bundle.model_id


def test_model_failing_selftest_rolls_back_by_itself(kiosk: Kiosk, releases: Releases) -> None:
    """A constant-output model passes signature checks but must be refused by the canary self-test."""
    kiosk.updater.submit(desired(releases.good1, "s1", "k1"))
    kiosk.wait_step("rel10", ("done",))
    kiosk.updater.submit(desired(releases.bad, "s1", "k1"))
    final = kiosk.wait_step("rel30", ("rolled_back", "failed", "done"))
    assert final.step == "rolled_back" and not final.ok
    assert "selftest" in final.detail
    assert len(kiosk.switches) == 1  # never switched to the bad pair
    p = kiosk.updater.store.pointer
    assert p.current is not None and p.current.release == "rel10" and "rel30" in p.failed
    assert ("rolled_back",) == tuple(k for k, _ in kiosk.alerts[-1:])
    assert sorted(x.name for x in kiosk.updater.store.bundles.iterdir()) == [
        releases.good1.manifest.bundle.model_id[:16]
    ]  # the refused bundle was removed
    # the retained desired arriving again (reconnect) is not retried
    n = len(kiosk.progress())
    kiosk.updater.submit(desired(releases.bad, "s1", "k1"))
    assert kiosk.transport.wait_for(lambda: len(kiosk.progress()) > n, WAIT_S)
    assert kiosk.progress()[-1].step == "failed" and "before" in kiosk.progress()[-1].detail
    assert len(kiosk.switches) == 1


def test_unhealthy_probation_rolls_back_to_the_old_pair(tmp_path: Path, releases: Releases) -> None:
    """Health regressing after the switch must put the last known good pair back, in memory and on disk."""
    healthy = threading.Event()
    healthy.set()
    k = Kiosk(
        tmp_path / "k", releases, probation_s=30.0, probe=lambda: None if healthy.is_set() else "errors 5 > 0"
    )
    k.updater.boot()
    k.updater.start()
    try:
        k.updater.submit(desired(releases.good1, "s1", "k1", probation_s=0.1))
        k.wait_step("rel10", ("done",))
        k.updater.submit(desired(releases.good2, "s1", "k1"))
        k.wait_step("rel20", ("probation",))
        healthy.clear()
        final = k.wait_step("rel20", ("rolled_back", "done", "failed"))
    finally:
        k.updater.stop()
    assert final.step == "rolled_back" and "errors" in final.detail
    a, b = releases.good1.manifest.bundle.model_id, releases.good2.manifest.bundle.model_id
    assert k.switches == [(a, 10), (b, 20), (a, 10)]
    p = GenerationStore(tmp_path / "k").pointer
    assert p.current is not None and p.current.release == "rel10" and p.state == "stable"


def test_tampered_artifact_and_replay_are_refused(kiosk: Kiosk, releases: Releases, tmp_path: Path) -> None:
    """A bundle byte flipped after signing, a bad signature, or an older sequence must never switch."""
    kiosk.updater.submit(desired(releases.good2, "s1", "k1"))
    kiosk.wait_step("rel20", ("done",))
    kiosk.updater.submit(desired(releases.good1, "s1", "k1"))  # older sequence, validly signed
    final = kiosk.wait_step("rel10", ("failed",))
    assert "version_replay" in final.detail

    # a copy of release 30 whose model.bin differs from the signed hash
    src = Path(releases.bad.url.removeprefix("file://")).parent
    manifest = json.loads((src / "release.json").read_text())
    evil = tmp_path / "evil.bin"
    data = bytearray(
        Path(manifest["bundle"]["files"]["model.bin"]["url"].removeprefix("file://")).read_bytes()
    )
    data[100] ^= 0xFF
    evil.write_bytes(bytes(data))
    forged = src.parent / "forged"
    forged.mkdir()
    manifest["bundle"]["files"]["model.bin"]["url"] = evil.as_uri()
    (forged / "release.json").write_text(json.dumps(manifest))  # signature no longer matches
    (forged / "release.sig").write_bytes((src / "release.sig").read_bytes())
    d = desired(releases.bad, "s1", "k1").model_copy(
        update={
            "release": "rel30",
            "url": (forged / "release.json").as_uri(),
            "sig_url": (forged / "release.sig").as_uri(),
        }
    )
    kiosk.updater.submit(d)
    final = kiosk.wait_step("rel30", ("failed",))
    assert "bad_signature" in final.detail
    assert [s[1] for s in kiosk.switches] == [20]


def test_hung_update_is_abandoned_by_deadline_and_next_release_installs(
    kiosk: Kiosk, releases: Releases
) -> None:
    """A release whose server never answers must give up by its deadline and not block the next one."""
    with socket.socket() as srv:  # accepts connections (backlog) and never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        hung = desired(releases.good1, "s1", "k1", deadline_s=1.0).model_copy(
            update={"url": f"http://127.0.0.1:{port}/release.json", "sig_url": f"http://127.0.0.1:{port}/s"}
        )
        kiosk.updater.sources = Sources([releases.root.as_uri() + "/", f"http://127.0.0.1:{port}/"])
        kiosk.updater.submit(hung)
        kiosk.wait_step("rel10", ("download",))
        final = kiosk.wait_step("rel10", ("failed",))
    assert "download" in final.detail
    kiosk.updater.submit(desired(releases.good2, "s1", "k1"))
    assert kiosk.wait_step("rel20", ("done", "failed", "rolled_back")).step == "done"


def test_crash_loop_in_probation_rolls_back_at_boot(tmp_path: Path, releases: Releases) -> None:
    """Restarting again and again while on probation must bring the previous pair back at boot."""
    k = Kiosk(tmp_path / "k", releases, probation_s=60.0)
    k.updater.boot()
    k.updater.start()
    k.updater.submit(desired(releases.good1, "s1", "k1", probation_s=0.0))
    k.wait_step("rel10", ("done",))
    k.updater.submit(desired(releases.good2, "s1", "k1"))
    k.wait_step("rel20", ("probation",))
    k.updater.stop()  # "crash" during probation: the pointer stays in probation
    models = []
    for _ in range(3):
        again = Kiosk(tmp_path / "k", releases, probation_s=60.0)
        loaded = again.updater.boot()
        assert loaded is not None
        models.append(loaded.generation.release)
    assert models == ["rel20", "rel20", "rel10"]  # max_probation_boots=2, then back
    p = GenerationStore(tmp_path / "k").pointer
    assert (
        p.state == "stable" and p.current is not None and p.current.release == "rel10" and "rel20" in p.failed
    )


def test_compile_child_limits(tmp_path: Path, releases: Releases) -> None:
    """The child must be killed at its time limit and fail under a too-small memory limit."""
    bundle = next((releases.root / "a").glob("model.xml")).parent
    with pytest.raises(CompileFailed) as exc:
        compile_in_child(bundle, [], tmp_path, timeout_s=0.05, mem_bytes=2 << 30)
    assert exc.value.reason == "timeout"
    with pytest.raises(CompileFailed) as exc:
        compile_in_child(bundle, [], tmp_path, timeout_s=60, mem_bytes=64 << 20)
    assert exc.value.reason in ("memory", "crash", "bad_model")
    ok = compile_in_child(bundle, [], tmp_path, timeout_s=60, mem_bytes=2 << 30)
    assert ok.dim == 64


def _configured(tmp_path: Path, releases: Releases) -> Any:
    """The kiosk's configured model (a FakeEmbedder) and its snapshot v3, as the app would adopt them."""
    import numpy as np

    from device.generations import LoadedGeneration, generation_zero
    from device.sync.active import ActiveSnapshot
    from models.fake import FakeEmbedder
    from storelens.snapshot import verify_snapshot
    from tests.device.snapshots import make_snapshot

    emb = FakeEmbedder(64)
    vectors = emb.embed([np.full((32, 32, 3), i * 60, np.uint8) for i in range(3)])
    d = make_snapshot(tmp_path / "configured-v3", vectors, ["a", "b", "c"], releases.key,
                      model_id=emb.model_id, version=3)
    snap = ActiveSnapshot.load(d, verify_snapshot(d, [releases.key.public_key()]))
    return LoadedGeneration(generation_zero(emb.model_id, 3), emb, snap)


def test_first_update_failing_probation_rolls_back_to_the_configured_pair(
    tmp_path: Path, releases: Releases
) -> None:
    """The very first update has the configured model+snapshot (recorded at boot) as its last known good:
    a regression in probation puts exactly that pair back, in memory and on disk, also after a restart."""
    from device.generations import CONFIGURED

    configured = _configured(tmp_path, releases)
    regressed = "3 embedding error(s) since the switch"
    k = Kiosk(tmp_path / "k", releases, probation_s=30.0, probe=lambda: regressed)
    assert k.updater.boot() is None  # nothing released yet: the app serves its configured pair
    k.updater.switcher.adopt(configured)
    p = GenerationStore(tmp_path / "k").pointer
    assert p.current == configured.generation and p.state == "stable"
    k.updater.start()
    try:
        k.updater.submit(desired(releases.good1, "s1", "k1"))
        final = k.wait_step("rel10", ("rolled_back", "done", "failed"))
    finally:
        k.updater.stop()
    assert final.step == "rolled_back" and "embedding error" in final.detail, final.detail
    assert final.model == configured.generation.model_id and final.snapshot == 3
    a = releases.good1.manifest.bundle.model_id
    assert k.switches == [(a, 10), (configured.generation.model_id, 3)]
    assert k.updater.active is configured
    p = GenerationStore(tmp_path / "k").pointer
    assert p.current == configured.generation and p.current.release == CONFIGURED
    assert p.state == "stable" and p.previous is None and "rel10" in p.failed
    assert list(GenerationStore(tmp_path / "k").bundles.iterdir()) == []  # the failed release is gone
    # restart: the pointer names the configured pair, so the app serves it as at boot
    again = Kiosk(tmp_path / "k", releases)
    assert again.updater.boot() is None
    assert again.updater.store.pointer.current == configured.generation


def test_restart_in_first_probation_then_regression_reopens_the_configured_pair(
    tmp_path: Path, releases: Releases
) -> None:
    """Probation of the first update resumed after a restart: a regression then asks the app to open its
    configured pair again and goes back to it (the pointer names the configured model and snapshot)."""
    configured = _configured(tmp_path, releases)
    k = Kiosk(tmp_path / "k", releases, probation_s=60.0)
    assert k.updater.boot() is None
    k.updater.switcher.adopt(configured)
    k.updater.start()
    k.updater.submit(desired(releases.good1, "s1", "k1"))
    k.wait_step("rel10", ("probation",))
    k.updater.stop()  # the kiosk restarts during probation
    p = GenerationStore(tmp_path / "k").pointer
    assert p.state == "probation" and p.previous == configured.generation

    again = Kiosk(tmp_path / "k", releases, probation_s=30.0, probe=lambda: "embed p50 90 ms vs 9 ms")
    opened: list[Any] = []
    again.updater.switcher.open_configured = lambda pair: opened.append(pair) or configured
    loaded = again.updater.boot()
    assert loaded is not None and loaded.generation.release == "rel10"
    again.updater.start()
    try:
        final = again.wait_step("rel10", ("rolled_back", "done", "failed"))
    finally:
        again.updater.stop()
    assert final.step == "rolled_back", final.detail
    assert opened == [configured.generation]
    assert again.switches == [(configured.generation.model_id, 3)]
    p = GenerationStore(tmp_path / "k").pointer
    assert p.current == configured.generation and p.state == "stable" and "rel10" in p.failed


def test_a_failed_switch_never_retires_the_model_now_serving(tmp_path: Path, releases: Releases) -> None:
    """The app's half of a switch raising after the updater made the new pair active: the update's cleanup
    retired that pair's model, which is now closed after a grace period, so every later crop would fail."""
    retired: list[Any] = []

    def on_switch(emb: Any, snap: Any) -> None:
        raise RuntimeError("the app's switch failed")

    updater = Updater(
        UpdateConfig(state_dir=tmp_path / "k", probation_s=0.2, probe_interval_s=0.02, compile_timeout_s=60),
        Topics("s1", "k1"), [releases.key.public_key()], transport=None, on_switch=on_switch,
        retire=retired.append, sources=Sources([releases.root.as_uri() + "/"]),
    )
    updater.boot()
    updater.start(subscribe=False)
    try:
        updater.submit(desired(releases.good1, "s1", "k1"))
        assert updater.idle.wait(WAIT_S)
        assert updater.last is not None and updater.last.step == "failed", updater.last
        assert updater.active is not None and updater.active.generation.release == "rel10"
        assert all(e is not updater.active.embedder for e in retired)
    finally:
        updater.stop()
        updater.switcher.close_loaded()
