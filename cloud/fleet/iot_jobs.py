"""The AWS IoT channel: one IoT Job per rollout stage, with rollout, abort and timeout configuration.

Kiosks are the things of a thing group named after the store (the fleet-provisioning template puts them
there). The job document is storelens.release.job_document(DesiredRelease); the kiosk's Jobs client
(device/update/jobs.py) reports IN_PROGRESS with {"step", "release"} and ends SUCCEEDED or FAILED.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cloud.fleet.channel import ChannelError, KioskView
from storelens.protocol import DesiredRelease
from storelens.release import job_document

_LOGGER = logging.getLogger(__name__)

_STEP_OF_STATUS = {
    "QUEUED": "queued",
    "SUCCEEDED": "done",
    "FAILED": "failed",
    "TIMED_OUT": "failed",
    "REJECTED": "failed",
    "CANCELED": "failed",
    "REMOVED": "failed",
}


@dataclass(frozen=True, slots=True)
class JobsPolicy:
    """Fleet-safety knobs of every stage's job (AWS IoT job-rollout-abort, job timeouts)."""

    max_per_minute: int = 50  # executions started per minute within a stage
    abort_threshold_pct: float = 10.0  # cancel the stage's job when this share of executions failed...
    abort_min_executed: int = 1  # ...after at least this many finished (1: a canary failure aborts at once)
    in_progress_timeout_min: int = 30  # an execution IN_PROGRESS longer than this is TIMED_OUT


class IotJobsChannel:
    """RolloutChannel over boto3 ``iot``: create_job per stage, describe_job_execution to poll."""

    def __init__(
        self, iot_client: Any, *, policy: JobsPolicy | None = None, job_prefix: str = "storelens"
    ) -> None:
        self._iot = iot_client
        self.policy = policy or JobsPolicy()
        self._prefix = job_prefix
        self._arns: dict[str, str] = {}
        self._job_of: dict[str, str] = {}  # thing -> job id
        self._release_of: dict[str, str] = {}  # job id -> release
        self.jobs: list[str] = []

    def discover(self, stores: Sequence[str], *, timeout_s: float = 10.0) -> list[KioskView]:
        out = []
        for store in stores:
            try:
                pages = self._iot.get_paginator("list_things_in_thing_group").paginate(thingGroupName=store)
                names = [n for page in pages for n in page.get("things", [])]
            except Exception as exc:  # botocore ClientError and friends: one line for the operator
                raise ChannelError(f"cannot list thing group {store!r}: {exc}") from exc
            for name in sorted(names):
                self._arns[name] = self._iot.describe_thing(thingName=name)["thingArn"]
                out.append(KioskView(store, name, state="registered"))
        return out

    def stage(self, kiosks: Sequence[KioskView], desired: DesiredRelease, *, stage: int) -> None:
        if not kiosks:
            return
        job_id = f"{self._prefix}-{desired.release}-s{stage}"[:64].replace(".", "_")
        p = self.policy
        try:
            self._iot.create_job(
                jobId=job_id,
                targets=[self._arns[k.kiosk] for k in kiosks],
                document=json.dumps(job_document(desired)),
                description=f"StoreLens release {desired.release}, stage {stage}",
                targetSelection="SNAPSHOT",
                jobExecutionsRolloutConfig={"maximumPerMinute": p.max_per_minute},
                abortConfig={
                    "criteriaList": [
                        {
                            "failureType": "FAILED",
                            "action": "CANCEL",
                            "thresholdPercentage": p.abort_threshold_pct,
                            "minNumberOfExecutedThings": p.abort_min_executed,
                        }
                    ]
                },
                timeoutConfig={"inProgressTimeoutInMinutes": p.in_progress_timeout_min},
            )
        except Exception as exc:
            raise ChannelError(f"create_job {job_id} failed: {exc}") from exc
        self.jobs.append(job_id)
        self._release_of[job_id] = desired.release
        for k in kiosks:
            self._job_of[k.kiosk] = job_id
        _LOGGER.info("stage %d: job %s for %d thing(s)", stage, job_id, len(kiosks))

    def poll(self, kiosks: Sequence[KioskView]) -> list[KioskView]:
        out = []
        for k in kiosks:
            job_id = self._job_of.get(k.kiosk)
            if job_id is None:
                out.append(k)
                continue
            ex = self._iot.describe_job_execution(jobId=job_id, thingName=k.kiosk)["execution"]
            status = str(ex.get("status", "QUEUED"))
            details = (ex.get("statusDetails") or {}).get("detailsMap") or {}
            step = (
                details.get("step")
                if status == "IN_PROGRESS"
                else _STEP_OF_STATUS.get(status, status.lower())
            )
            if status == "FAILED" and details.get("step") == "rolled_back":
                step = "rolled_back"
            release = self._release_of.get(job_id, job_id)
            out.append(
                replace(
                    k,
                    release=release,
                    step=step,
                    ok=status not in ("FAILED", "TIMED_OUT", "REJECTED"),
                    detail=str(details.get("detail", status)),
                    state="online",
                )
            )
        return out

    def halt(self, reason: str) -> None:
        """Cancel the stage jobs still running (queued executions never start)."""
        for job_id in self.jobs:
            try:
                self._iot.cancel_job(jobId=job_id, reasonCode="STORELENS_HALT", comment=reason[:2028])
            except Exception as exc:
                _LOGGER.warning("cancel_job %s: %s", job_id, exc)

    def close(self) -> None:
        pass
