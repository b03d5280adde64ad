"""The AWS IoT channel against moto's server mode: jobs per stage with rollout/abort/timeout, halt cancels."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID  # type: ignore[attr-defined]
from moto.iot.models import iot_backends
from moto.server import ThreadedMotoServer

from cloud.fleet.iot_jobs import IotJobsChannel, JobsPolicy
from cloud.fleet.rollout import Outcome, run_rollout
from storelens.protocol import DesiredRelease
from storelens.release import JOB_OPERATION, desired_from_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REGION = "eu-west-1"
DESIRED = DesiredRelease(
    kiosk="t",
    store="t",
    release="rel7",
    sequence=7,
    url="https://x/release.json",
    sig_url="https://x/release.sig",
    deadline_s=600,
)


@pytest.fixture(scope="module")
def iot() -> Iterator[Any]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "iot",
        region_name=REGION,
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    for store in ("s1", "s2"):
        client.create_thing_group(thingGroupName=store)
        for i in range(1, 4):
            name = f"{store}-k{i}"
            client.create_thing(thingName=name)
            client.add_thing_to_thing_group(thingGroupName=store, thingName=name)
    yield client
    server.stop()


def _device(job_id: str, thing: str, status: str, step: str) -> None:
    """Play the kiosk's Jobs client: what its execution updates would leave in the service."""
    ex = iot_backends[DEFAULT_ACCOUNT_ID][REGION].job_executions[(job_id, thing)]
    ex.status, ex.status_details_map = status, {"step": step, "release": "rel7"}


def test_stage_job_carries_rollout_abort_and_timeout_config(iot: Any) -> None:
    """Each stage is one job whose document parses back into the DesiredRelease, with the safety knobs."""
    ch = IotJobsChannel(
        iot,
        policy=JobsPolicy(
            max_per_minute=20, abort_threshold_pct=10.0, abort_min_executed=1, in_progress_timeout_min=30
        ),
    )
    kiosks = ch.discover(["s1", "s2"], timeout_s=5)
    assert [k.kiosk for k in kiosks] == [f"{s}-k{i}" for s in ("s1", "s2") for i in range(1, 4)]
    ch.stage(kiosks[:2], DESIRED, stage=0)
    job = iot.describe_job(jobId=ch.jobs[0])["job"]
    assert job["jobExecutionsRolloutConfig"]["maximumPerMinute"] == 20
    crit = job["abortConfig"]["criteriaList"][0]
    assert (
        crit["action"] == "CANCEL"
        and crit["failureType"] == "FAILED"
        and crit["minNumberOfExecutedThings"] == 1
    )
    assert job["timeoutConfig"]["inProgressTimeoutInMinutes"] == 30
    doc = json.loads(iot.get_job_document(jobId=ch.jobs[0])["document"])
    assert doc["operation"] == JOB_OPERATION
    assert desired_from_job(doc, store="s1", kiosk="s1-k1").release == "rel7"
    assert [v.step for v in ch.poll(kiosks[:2])] == ["queued", "queued"]


def test_rollout_over_jobs_halts_when_the_canary_fails(iot: Any) -> None:
    """Canary execution FAILED (rolled back) -> job cancelled, no job ever created for the others."""
    ch = IotJobsChannel(iot, job_prefix="halt")
    kiosks = ch.discover(["s1", "s2"], timeout_s=5)
    real_stage = ch.stage

    def stage(members: Any, desired: DesiredRelease, *, stage: int) -> None:
        real_stage(members, desired, stage=stage)
        _device(ch.jobs[-1], members[0].kiosk, "FAILED", "rolled_back")  # the canary fails its self-test

    ch.stage = stage  # type: ignore[method-assign,assignment]
    report = run_rollout(ch, DESIRED, kiosks, canary=1, batch_size=5, poll_interval_s=0.01)
    assert report.outcome is Outcome.HALTED and "rolled_back" in report.reason
    assert len(ch.jobs) == 1 and len(report.untouched) == 5
    assert iot.describe_job(jobId=ch.jobs[0])["job"]["status"] == "CANCELED"


def test_rollout_over_jobs_completes_stage_by_stage(iot: Any) -> None:
    """Executions SUCCEEDED stage after stage -> the rollout is done with one job per stage."""
    ch = IotJobsChannel(iot, job_prefix="ok")
    kiosks = ch.discover(["s1", "s2"], timeout_s=5)
    staged: list[str] = []
    real_stage = ch.stage

    def stage(members: Any, desired: DesiredRelease, *, stage: int) -> None:
        real_stage(members, desired, stage=stage)
        staged.append(ch.jobs[-1])
        for k in members:
            _device(ch.jobs[-1], k.kiosk, "SUCCEEDED", "done")

    ch.stage = stage  # type: ignore[method-assign,assignment]
    report = run_rollout(ch, DESIRED, kiosks, canary=2, batch_size=2, poll_interval_s=0.01)
    assert report.outcome is Outcome.DONE and len(staged) == 3
