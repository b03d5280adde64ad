"""Device side of AWS IoT Jobs over a real mosquitto; the test plays the Jobs service on $aws/... topics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device.comms.paho_transport import PahoTransport
from device.config import UpdateConfig
from device.sync import Sources
from device.update import JobsBridge, Updater
from storelens.protocol import Topics
from storelens.release import job_document
from tests.fleet.conftest import Releases
from tests.fleet.helpers import desired
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

THING = "k1"
BASE = f"$aws/things/{THING}/jobs"
WAIT_S = 60.0


class FakeJobsService:
    """Answers start-next with the queued job (if any) and accepts every execution update, recording it."""

    def __init__(self, port: int) -> None:
        self.queue: list[tuple[str, dict[str, Any]]] = []
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.start_requests = 0
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="jobs-service")
        self._c.on_connect = lambda c, *a: c.subscribe([(f"{BASE}/start-next", 1), (f"{BASE}/+/update", 1)])
        self._c.on_subscribe = lambda *a: self._ready.set()
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        assert self._ready.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        token = body.get("clientToken")
        if msg.topic.endswith("/start-next"):
            with self._cond:
                self.start_requests += 1
                job = self.queue.pop(0) if self.queue else None
                self._cond.notify_all()
            reply: dict[str, Any] = {"clientToken": token, "timestamp": 0}
            if job is not None:
                reply["execution"] = {
                    "jobId": job[0],
                    "status": "IN_PROGRESS",
                    "jobDocument": job[1],
                    "versionNumber": 1,
                    "executionNumber": 1,
                }
            client.publish(f"{BASE}/start-next/accepted", json.dumps(reply), qos=1)
            return
        job_id = msg.topic.split("/")[-2]
        with self._cond:
            self.updates.append((job_id, body))
            self._cond.notify_all()
        client.publish(f"{msg.topic}/accepted", json.dumps({"clientToken": token, "timestamp": 0}), qos=1)

    def notify(self, job_id: str, doc: dict[str, Any]) -> None:
        """Queue a job and announce it on notify-next, as the service does."""
        with self._cond:
            self.queue.append((job_id, doc))
        execution = {"jobId": job_id, "status": "QUEUED", "queuedAt": 0, "versionNumber": 1}
        self._c.publish(f"{BASE}/notify-next", json.dumps({"timestamp": 0, "execution": execution}), qos=1)

    def wait_terminal(self, job_id: str) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            return next((b for j, b in self.updates if j == job_id and b["status"] != "IN_PROGRESS"), None)

        with self._cond:
            assert self._cond.wait_for(lambda: final() is not None, WAIT_S), self.updates
            result = final()
            assert result is not None
            return result

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture
def kiosk(
    broker: Mosquitto, tmp_path: Path, releases: Releases
) -> Iterator[tuple[FakeJobsService, JobsBridge]]:
    service = FakeJobsService(broker.port)
    transport = PahoTransport(broker.url, f"{THING}-{tmp_path.name}"[:60])
    transport.connect(will=None, timeout_s=10)
    updater = Updater(
        UpdateConfig(state_dir=tmp_path / "k", probation_s=0.1, probe_interval_s=0.02),
        Topics("s1", THING),
        [releases.key.public_key()],
        transport=transport,
        on_switch=lambda e, s: None,
        sources=Sources([releases.root.as_uri() + "/"]),
    )
    updater.boot()
    updater.start(subscribe=False)
    bridge = JobsBridge(transport, THING, updater)
    bridge.start()
    yield service, bridge
    bridge.stop()
    updater.stop()
    transport.close()
    service.close()


def test_job_runs_the_release_and_reports_each_step(
    kiosk: tuple[FakeJobsService, JobsBridge], releases: Releases
) -> None:
    """A job from notify-next must run the update and report IN_PROGRESS per step, then SUCCEEDED."""
    service, _ = kiosk
    service.notify("job-1", job_document(desired(releases.good1, "s1", THING)))
    final = service.wait_terminal("job-1")
    assert final["status"] == "SUCCEEDED" and final["statusDetails"]["step"] == "done"
    steps = [b["statusDetails"]["step"] for j, b in service.updates if j == "job-1"]
    assert steps == ["download", "verify", "compile", "selftest", "switch", "probation", "done"]
    assert all(isinstance(v, str) for _, b in service.updates for v in b["statusDetails"].values())
    assert service.start_requests >= 2  # at start (nothing queued) and after notify-next


def test_failing_job_reports_failed_and_next_job_still_runs(
    kiosk: tuple[FakeJobsService, JobsBridge], releases: Releases
) -> None:
    """A release that fails the self-test ends FAILED (rolled_back) and does not block the next job."""
    service, _ = kiosk
    service.notify("job-bad", job_document(desired(releases.bad, "s1", THING)))
    final = service.wait_terminal("job-bad")
    assert final["status"] == "FAILED" and final["statusDetails"]["step"] == "rolled_back"
    service.notify("job-good", job_document(desired(releases.good1, "s1", THING)))
    assert service.wait_terminal("job-good")["status"] == "SUCCEEDED"


def test_foreign_job_document_is_rejected(kiosk: tuple[FakeJobsService, JobsBridge]) -> None:
    """A job that is not a StoreLens release must be answered REJECTED, not run."""
    service, _ = kiosk
    service.notify("job-x", {"operation": "AWS-Reboot"})
    assert service.wait_terminal("job-x")["status"] == "REJECTED"
