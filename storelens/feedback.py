"""The store-learning loop's contract: what a kiosk publishes when a customer answers "Is this it?".

One message per held item that got an answer on the screen (or timed out), on

    dt/storelens/{store}/{kiosk}/events/feedback     QoS 1, from the durable outbox

It carries the crop the kiosk embedded (the held item only, never the full frame; JPEG capped in bytes
and pixels), the pooled vector (float16, base64), the model and snapshot it was answered with, what was
shown and what the customer chose. The whole message stays under AWS IoT Core's 128 KB limit
(``MAX_PAYLOAD_BYTES``). The cloud's collector checks the rest (the JPEG decodes, known snapshot/model).

``answer``:
- ``confirmed``: the customer tapped a product (``chosen_sku``): a store photo of that product.
- ``not_here``: the store does not seem to carry it: after staff review, a negative ("not carried") or a
  photo of a product the catalog lacks a store photo for.
- ``no_answer``: no tap within the screen's timeout: kept for counts, never used as a label.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from storelens.protocol import (
    APP,
    MAX_PAYLOAD_BYTES,
    ProtocolError,
    _Message,
    check_id,
    decode,
    parse_kiosk_topic,
)

FEEDBACK_SUFFIX = "events/feedback"
MAX_CROP_JPEG_BYTES = 80_000  # base64 makes it ~107 KB: room for the vector and fields under 128 KB
MAX_CROP_SIDE_PX = 384  # the embedder sees 224-256 px; more only costs bytes
MAX_DIM = 4096
_SKU = r"^[^\x00-\x1f]{1,128}$"

Answer = Literal["confirmed", "not_here", "no_answer"]


def feedback_topic(store: str, kiosk: str) -> str:
    """``dt/storelens/{store}/{kiosk}/events/feedback``."""
    return f"dt/{APP}/{check_id(store, 'store id')}/{check_id(kiosk, 'kiosk id')}/{FEEDBACK_SUFFIX}"


def store_feedback_filter(store: str) -> str:
    """Subscription filter for every kiosk's feedback in one store (the collector)."""
    return f"dt/{APP}/{check_id(store, 'store id')}/+/{FEEDBACK_SUFFIX}"


def encode_vector(vec: np.ndarray) -> str:
    """A 1-D float vector as base64 of little-endian float16."""
    arr = np.asarray(vec, dtype="<f2").reshape(-1)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> np.ndarray:
    """The float32 vector of ``encode_vector``; ProtocolError when it is not ``dim`` finite numbers."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"vector is not base64: {exc}") from exc
    if len(raw) != 2 * dim:
        raise ProtocolError(f"vector has {len(raw) // 2} values, dim says {dim}")
    arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ProtocolError("vector has non-finite values")
    return arr


class FeedbackEvent(_Message):
    """A customer's answer to one held item's result, with the store photo it makes (see module doc)."""

    TYPE: ClassVar[str] = "feedback"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    match_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # the MatchEvent this answers
    seq: int = Field(default=0, ge=0)
    boot_id: str = Field(default="", max_length=64)
    answer: Answer
    chosen_sku: str | None = Field(default=None, pattern=_SKU)
    shown: list[str] = Field(default_factory=list, max_length=16)  # skus in screen order, top first
    top_score: float | None = None
    model: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    snapshot: int = Field(ge=0)
    dim: int = Field(ge=1, le=MAX_DIM)
    vector: str = Field(max_length=4 * MAX_DIM)  # encode_vector()
    crop_jpeg: str = Field(max_length=(MAX_CROP_JPEG_BYTES * 4) // 3 + 4)  # base64 JPEG of the held item
    answered_after_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackEvent:
        if self.answer == "confirmed" and not self.chosen_sku:
            raise ValueError("a confirmed answer names chosen_sku")
        if self.answer != "confirmed" and self.chosen_sku is not None:
            raise ValueError(f"a {self.answer} answer names no chosen_sku")
        return self

    def crop_bytes(self) -> bytes:
        """The JPEG bytes of the crop; ProtocolError when not base64 or over the cap."""
        try:
            raw = base64.b64decode(self.crop_jpeg, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"crop_jpeg is not base64: {exc}") from exc
        if len(raw) > MAX_CROP_JPEG_BYTES:
            raise ProtocolError(f"crop of {len(raw)} bytes exceeds {MAX_CROP_JPEG_BYTES}")
        if not raw.startswith(b"\xff\xd8"):
            raise ProtocolError("crop_jpeg is not a JPEG")
        return raw

    def embedding(self) -> np.ndarray:
        """The pooled vector as float32 (``dim`` values)."""
        return decode_vector(self.vector, self.dim)


def make_feedback(
    *, store: str, kiosk: str, match_id: str, answer: Answer, chosen_sku: str | None, shown: list[str],
    model: str, snapshot: int, vector: np.ndarray, crop_jpeg: bytes, **extra: Any,
) -> FeedbackEvent:
    """Build a feedback message; ProtocolError when the crop is over the cap or the result too big."""
    if len(crop_jpeg) > MAX_CROP_JPEG_BYTES:
        raise ProtocolError(f"crop of {len(crop_jpeg)} bytes exceeds {MAX_CROP_JPEG_BYTES}")
    vec = np.asarray(vector).reshape(-1)
    msg = FeedbackEvent(
        store=store, kiosk=kiosk, match_id=match_id, answer=answer, chosen_sku=chosen_sku, shown=shown,
        model=model, snapshot=snapshot, dim=int(vec.size), vector=encode_vector(vec),
        crop_jpeg=base64.b64encode(crop_jpeg).decode("ascii"), **extra,
    )
    if len(msg.to_bytes()) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"feedback message of {len(msg.to_bytes())} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return msg


def parse_feedback(topic: str, payload: bytes) -> FeedbackEvent:
    """Decode a feedback message and check that the topic's store and kiosk are the payload's.

    Raises ProtocolError naming the problem (size, JSON, fields, topic/payload mismatch, vector, crop).
    """
    store, kiosk, rest = parse_kiosk_topic(topic)
    if rest != FEEDBACK_SUFFIX:
        raise ProtocolError(f"not a feedback topic: {topic!r}")
    msg = decode(payload, FeedbackEvent)
    if (msg.store, msg.kiosk) != (store, kiosk):
        raise ProtocolError(
            f"payload names store/kiosk {msg.store}/{msg.kiosk}, topic says {store}/{kiosk}"
        )
    msg.embedding()
    msg.crop_bytes()
    return msg
