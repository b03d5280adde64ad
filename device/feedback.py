"""The kiosk side of the store-learning loop: a customer's answer on the screen -> a FeedbackEvent in the
durable outbox (storelens.feedback, ``dt/storelens/{store}/{kiosk}/events/feedback``, QoS 1).

The frame path only keeps references (the held item's last embedded crop and its vectors, in ItemResult);
``remember`` files them under the MatchEvent's id. Everything that costs (the pooled vector, the JPEG, the
message) happens in ``on_answer``, on the screen's threads when the customer taps or the question times
out. The vector sent is the item's mean model-space vector (the bundle's pooled features, before the
snapshot's projection): the cloud rebuilds snapshots and refits their adapter from pooled features, so a
projected vector would be of no use to the next snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from device.config import FeedbackConfig
from device.pipeline import ItemResult
from device.screen.answers import Answer
from storelens.feedback import MAX_CROP_JPEG_BYTES, MAX_CROP_SIDE_PX, make_feedback
from storelens.protocol import ProtocolError, Topics

_LOGGER = logging.getLogger(__name__)

_KEEP: Final = 32  # results remembered for an answer; the screen resolves each long before 32 more
_HOUR_S: Final = 3600.0
_QUALITY_STEP: Final = 10  # over the byte cap: retry this much lower, then smaller, until it fits
_MIN_QUALITY: Final = 40


class FeedbackError(Exception):
    """A crop that cannot become a capped JPEG (empty, undecodable)."""


def encode_crop(crop: npt.NDArray[Any], quality: int) -> bytes:
    """The crop (BGR) as a JPEG of at most MAX_CROP_SIDE_PX a side and MAX_CROP_JPEG_BYTES."""
    img = np.asarray(crop)
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise FeedbackError(f"crop of shape {img.shape} is not an image")
    side = max(img.shape[0], img.shape[1])
    if side > MAX_CROP_SIDE_PX:
        s = MAX_CROP_SIDE_PX / side
        img = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                         interpolation=cv2.INTER_AREA)
    q = quality
    while True:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:
            raise FeedbackError("JPEG encoding failed")
        if buf.size <= MAX_CROP_JPEG_BYTES:
            return buf.tobytes()
        if q - _QUALITY_STEP >= _MIN_QUALITY:
            q -= _QUALITY_STEP
        elif min(img.shape[0], img.shape[1]) > 16:  # noise-like crops: fewer pixels
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
        else:
            raise FeedbackError(f"crop does not fit {MAX_CROP_JPEG_BYTES} bytes as JPEG")


def pooled_vector(vectors: tuple[npt.NDArray[np.float32], ...]) -> npt.NDArray[np.float32]:
    """The item's mean model-space vector, renormalised (as the pipeline's aggregate averages them)."""
    v = np.mean(np.stack([np.asarray(x, dtype=np.float32) for x in vectors]), axis=0)
    norm = float(np.linalg.norm(v))
    out: npt.NDArray[np.float32] = (v / norm if norm > 0 else v).astype(np.float32)
    return out


@dataclass
class FeedbackCounters:
    sent: int = 0
    rate_limited: int = 0
    disabled: int = 0
    failed: int = 0
    unknown: int = 0


class FeedbackRecorder:
    """Keeps each shown item's crop and vectors by match id; builds and queues its answer's message."""

    def __init__(
        self, cfg: FeedbackConfig, topics: Topics, publish: Callable[[str, bytes], None], *,
        boot_id: str = "", clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._topics = topics
        self._publish = publish
        self._boot_id = boot_id
        self._clock = clock
        self._lock = threading.Lock()
        self._held: OrderedDict[str, ItemResult] = OrderedDict()
        self._sent_t: deque[float] = deque()  # send times in the last hour (rate limit)
        self._seq = 0
        self.counters = FeedbackCounters()

    def remember(self, match_id: str, result: ItemResult) -> None:
        """File a shown item's references (no copy, no encode): cheap enough for the result path."""
        if not self._cfg.enabled or result.crop is None or not result.vectors:
            return
        with self._lock:
            self._held[match_id] = result
            while len(self._held) > _KEEP:
                self._held.popitem(last=False)

    def on_answer(self, answer: Answer) -> bool:
        """The screen resolved a result: queue its feedback message; True when queued (never raises)."""
        c = self.counters
        if not self._cfg.enabled:
            c.disabled += 1
            return False
        with self._lock:
            held = self._held.pop(answer.match_id, None)
            if held is None:
                c.unknown += 1
                _LOGGER.info("answer for result %s: no crop kept, nothing sent", answer.match_id[:12])
                return False
            if not self._take_slot():
                c.rate_limited += 1
                _LOGGER.info("feedback over %d per hour: answer for %s counted, not sent",
                             self._cfg.max_per_hour, answer.match_id[:12])
                return False
            self._seq += 1
            seq = self._seq
        try:
            payload = self.build(answer, held, seq)
            self._publish(self._topics.feedback, payload)
        except (FeedbackError, ProtocolError, ValueError) as exc:
            c.failed += 1
            _LOGGER.warning("feedback for result %s not sent: %s", answer.match_id[:12], exc)
            return False
        c.sent += 1
        return True

    def build(self, answer: Answer, r: ItemResult, seq: int = 0) -> bytes:
        """The message's bytes: capped crop JPEG, pooled vector, what was shown and chosen."""
        assert r.crop is not None
        jpeg = encode_crop(r.crop, self._cfg.jpeg_quality)
        top = next((h.score for h in r.hits if answer.shown and h.sku == answer.shown[0]), None)
        msg = make_feedback(
            store=self._topics.store, kiosk=self._topics.kiosk, match_id=answer.match_id,
            answer=answer.answer, chosen_sku=answer.sku, shown=list(answer.shown), model=r.model_id,
            snapshot=r.snapshot_version, vector=pooled_vector(r.vectors), crop_jpeg=jpeg,
            seq=seq, boot_id=self._boot_id, top_score=top, answered_after_s=answer.answered_after_s,
        )
        return msg.to_bytes()

    def _take_slot(self) -> bool:
        """Rate limit (lock held): at most max_per_hour sends in any rolling hour."""
        now = self._clock()
        while self._sent_t and now - self._sent_t[0] >= _HOUR_S:
            self._sent_t.popleft()
        if len(self._sent_t) >= self._cfg.max_per_hour:
            return False
        self._sent_t.append(now)
        return True
