"""The feedback message contract and the feedback store (records, de-duplication, decisions)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cloud.feedback.store import FeedbackStore, FeedbackStoreError
from storelens.feedback import (
    MAX_CROP_JPEG_BYTES,
    feedback_topic,
    make_feedback,
    parse_feedback,
    store_feedback_filter,
)
from storelens.protocol import MAX_PAYLOAD_BYTES, ProtocolError, Topics

MODEL = "ab" * 32


def _jpeg(seed: int = 0, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _msg(**kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = dict(
        store="s1", kiosk="k1", match_id="m1", answer="confirmed", chosen_sku="SKU-1",
        shown=["SKU-2", "SKU-1"],
        model=MODEL, snapshot=3, vector=np.linspace(-1, 1, 1280), crop_jpeg=_jpeg(),
    )
    args.update(kw)
    return make_feedback(**args)  # type: ignore[arg-type]


def test_topic_is_in_the_kiosk_tree() -> None:
    assert feedback_topic("s1", "k1") == Topics("s1", "k1").feedback == "dt/storelens/s1/k1/events/feedback"
    assert store_feedback_filter("s1") == "dt/storelens/s1/+/events/feedback"


def test_round_trip_keeps_vector_and_crop() -> None:
    msg = _msg()
    back = parse_feedback(feedback_topic("s1", "k1"), msg.to_bytes())
    assert back.chosen_sku == "SKU-1" and back.crop_bytes() == _jpeg()
    np.testing.assert_allclose(back.embedding(), np.linspace(-1, 1, 1280), atol=1e-3)


def test_largest_allowed_crop_fits_iot_core() -> None:
    """A crop at the cap with a 4096-d vector still fits AWS IoT Core's 128 KB."""
    crop = b"\xff\xd8" + b"\0" * (MAX_CROP_JPEG_BYTES - 2)
    msg = _msg(vector=np.zeros(4096), crop_jpeg=crop)
    assert len(msg.to_bytes()) <= MAX_PAYLOAD_BYTES


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(kiosk="k2"), "topic says"),
        (lambda d: d.update(vector=d["vector"][:-8]), "vector"),
        (lambda d: d.update(crop_jpeg="AAAA"), "not a JPEG"),
        (lambda d: d.update(chosen_sku=None), "chosen_sku"),
        (lambda d: d.update(answer="maybe"), "answer"),
        (lambda d: d.update(model="not-hex"), "model"),
    ],
)
def test_forged_messages_are_refused_with_a_reason(mutate, needle) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads(_msg().to_bytes())
    mutate(raw)
    with pytest.raises(ProtocolError, match=needle):
        parse_feedback(feedback_topic("s1", "k1"), json.dumps(raw).encode())


def test_oversized_crop_is_refused_at_the_kiosk() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        _msg(crop_jpeg=b"\xff\xd8" + b"\0" * MAX_CROP_JPEG_BYTES)


def test_store_deduplicates_replays_and_decisions_are_reversible(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = FeedbackStore(tmp_path)
    msg = _msg()
    rid, new = store.put(msg)
    assert new and store.put(msg) == (rid, False)
    assert store.get(rid).status == "pending" and store.crop_path(rid).read_bytes() == _jpeg()
    store.decide(rid, "approved", who="anna")
    assert [r.label_sku for r in store.approved("s1")] == ["SKU-1"]
    store.decide(rid, "reassigned", sku="SKU-2", who="bo")
    assert store.get(rid).label_sku == "SKU-2" and store.get(rid).decided_by == "bo"
    store.decide(rid, "rejected", who="anna")
    assert store.approved() == [] and len(store.history(rid)) == 3
    with pytest.raises(FeedbackStoreError, match="needs a product"):
        store.decide(rid, "reassigned", who="bo")


def test_no_answer_is_never_a_label(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = FeedbackStore(tmp_path)
    rid, _ = store.put(_msg(answer="no_answer", chosen_sku=None))
    assert store.get(rid).status == "unlabelled" and store.approved() == []


def test_a_torn_decision_line_is_skipped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = FeedbackStore(tmp_path)
    rid, _ = store.put(_msg())
    store.decide(rid, "approved", who="anna")
    with open(tmp_path / "decisions.jsonl", "a") as fh:
        fh.write('{"record_id": "x", "deci')
    assert store.get(rid).status == "approved"
