"""The feedback collector on the shipped broker config: its `collector` user reads feedback, nothing more."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cloud.feedback.collector import BrokerConfig, FeedbackCollector
from cloud.feedback.store import FeedbackStore
from cloud.feedback.verify import KnownSnapshots
from storelens.feedback import feedback_topic
from tests.deploy.conftest import PASSWORDS, STORE, StoreBroker
from tests.deploy.test_mosquitto_acl import A, assert_not_delivered, peer
from tests.feedback.conftest import MODEL, feedback

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 135


def test_collector_user_collects_over_tls_and_cannot_forge_or_read_more(
    store_broker: StoreBroker, tmp_path: Path
) -> None:
    """The collector must log in over mqtts with its password and get kiosks' feedback; its user must not
    publish feedback (forge a kiosk's) nor read match events."""
    cfg = BrokerConfig(
        url=f"mqtts://localhost:{store_broker.tls_port}", client_id=f"t-{uuid.uuid4().hex[:8]}",
        username="collector", password=PASSWORDS["collector"], ca=str(store_broker.ca),
    )
    known = KnownSnapshots(STORE, model_ids=[MODEL])
    c = FeedbackCollector(STORE, cfg, FeedbackStore(tmp_path / "fb"), known)
    c.start()
    try:
        with peer(store_broker, "kA") as kiosk:
            msg = feedback("kA", 1, store=STORE)
            assert kiosk.publish(feedback_topic(STORE, "kA"), msg.to_bytes()).value < 128
            assert c.wait_handled(1, 10.0) and c.stats()["stored"] == 1
    finally:
        c.stop()
    # One connection per login (use_username_as_clientid): the spy logs in as the collector once it left.
    with peer(store_broker, "kA") as kiosk, peer(store_broker, "ops") as ops, \
            peer(store_broker, "collector", tag="spy") as spy:  # fmt: skip
        forged = feedback("kA", 2, store=STORE)
        assert spy.publish(feedback_topic(STORE, "kA"), forged.to_bytes()).value == NOT_AUTHORIZED
        spy.subscribe(A.match)
        assert kiosk.publish(A.match, b"{}").value < 128
        assert_not_delivered(ops, spy, A.match)
    assert len(FeedbackStore(tmp_path / "fb").records()) == 1


