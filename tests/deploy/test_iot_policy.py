"""Lint the IoT policy: a thing connects only as itself and uses only its own topics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

POLICY = Path(__file__).resolve().parents[2] / "deploy" / "iot" / "policy.json"
THING = "${iot:Connection.Thing.ThingName}"
STORE = "${iot:Connection.Thing.Attributes[store]}"
ACTIONS = {"iot:Connect", "iot:Publish", "iot:RetainPublish", "iot:Subscribe", "iot:Receive"}


def _statements() -> list[dict[str, Any]]:
    doc = json.loads(POLICY.read_text())
    assert doc["Version"] == "2012-10-17"
    out = []
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and set(st) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        out.append({"actions": actions, "resources": resources, "st": st})
    return out


def _by_action(action: str) -> list[str]:
    return [r for s in _statements() if action in s["actions"] for r in s["resources"]]


def _path(resource: str, kind: str) -> str:
    m = re.match(rf"^arn:aws:iot:[^:]+:[^:]+:{kind}/(.+)$", resource)
    assert m, f"{resource!r} is not an iot {kind} ARN"
    return m.group(1)


def test_only_known_actions_and_no_blanket_wildcards() -> None:
    """No iot:*, no Resource '*', only the MQTT actions a kiosk needs."""
    for s in _statements():
        assert set(s["actions"]) <= ACTIONS
        for r in s["resources"]:
            assert r != "*" and not r.endswith(":topic/*") and not r.endswith(":topicfilter/*")


def test_connect_only_as_its_own_client_id() -> None:
    """iot:Connect is allowed for client id == thing name only, and only for a thing attached to the cert."""
    res = _by_action("iot:Connect")
    assert res == [f"arn:aws:iot:*:*:client/{THING}"]
    st = next(s["st"] for s in _statements() if "iot:Connect" in s["actions"])
    assert st["Condition"]["Bool"]["iot:Connection.Thing.IsAttached"] == "true"


@pytest.mark.parametrize("action", ["iot:Publish", "iot:RetainPublish"])
def test_publish_only_under_its_own_topics(action: str) -> None:
    """Every publish resource names the thing (telemetry under its store + name, or its own jobs topics)."""
    for r in _by_action(action):
        topic = _path(r, "topic")
        assert THING in topic, topic
        if topic.startswith("dt/"):
            assert topic.startswith(f"dt/storelens/{STORE}/{THING}/"), topic
        else:
            assert topic.startswith(f"$aws/things/{THING}/jobs/"), topic
        assert not topic.startswith(("cmd/", "bc/")), "a kiosk never publishes commands or broadcasts"


def test_subscribe_and_receive_only_its_commands_store_broadcast_and_jobs() -> None:
    """Subscribe/Receive: its own cmd subtree, its store's snapshot broadcast (read-only), its jobs."""
    for action, kind in (("iot:Subscribe", "topicfilter"), ("iot:Receive", "topic")):
        for r in _by_action(action):
            topic = _path(r, kind)
            assert (
                topic.startswith(f"cmd/storelens/{STORE}/{THING}/")
                or topic == f"bc/storelens/{STORE}/snapshot"
                or topic.startswith(f"$aws/things/{THING}/jobs/")
            ), topic


def test_jobs_topics_the_device_client_uses_are_allowed() -> None:
    """The Jobs client's subscriptions (device/update/jobs.py) are covered by the policy."""
    subs = [_path(r, "topicfilter") for r in _by_action("iot:Subscribe")]
    base = f"$aws/things/{THING}/jobs"
    for want in (f"{base}/notify-next", f"{base}/start-next/accepted", f"{base}/+/update/accepted"):
        assert any(re.fullmatch(re.escape(s).replace(r"\*", ".*"), want) for s in subs), want
