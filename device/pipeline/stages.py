"""Pipeline stages: detect (+ async embed submit) and search/aggregate, each a class with ``run(stop)``.

Inference overlaps capture and search: the detect stage submits steady crops to the embedder's async
queue (OpenVINO threads, GIL released) and goes on with the next frame; the embedder's callback hands the
vector to the search stage. A semaphore bounds the crops in flight (submit -> searched), so the hand-off
queue can never fill and a slow search back-pressures detection rather than growing memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from device.camera.buffer import END, BoundedQueue, Frame
from device.comms.stats import LatencyStats
from device.detect.detector import Detection, DetectorPort, DetectState
from device.pipeline.aggregate import ItemResult, aggregate
from device.sync.active import ActiveSnapshot
from models.port import EmbedderPort, embed_one

_LOGGER = logging.getLogger(__name__)

_GET_TIMEOUT_S: Final = 0.1  # queue polls re-check the stop event at least this often


Callback = Callable[[npt.NDArray[np.float32] | None, object], None]


def submit(
    embedder: EmbedderPort, crop: npt.NDArray[np.uint8], callback: Callback, userdata: object = None
) -> None:
    """Embed ``crop`` and call ``callback(vector, userdata)``: asynchronously through the adapter's own
    ``submit`` (OpenVINO's request threads), else inline (a FakeEmbedder; a failure calls back with None)."""
    native = getattr(embedder, "submit", None)
    if callable(native):
        native(crop, callback, userdata)
        return
    try:
        vector: npt.NDArray[np.float32] | None = embed_one(embedder, crop)
    except Exception:
        _LOGGER.exception("embedding failed")
        vector = None
    callback(vector, userdata)


@dataclass(frozen=True, slots=True)
class ModelPair:
    """The model and the index built by it: swapped as ONE reference, so an item never mixes the two."""

    embedder: EmbedderPort
    snapshot: ActiveSnapshot | None

    @property
    def model_id(self) -> str:
        return str(self.embedder.model_id)


PairProvider = Callable[[], ModelPair]


@dataclass(frozen=True, slots=True)
class Pending:
    """One crop in flight, with the timings gathered so far."""

    item_id: int
    frame_seq: int
    t_capture: float
    capture_ms: float
    detect_ms: float
    t_submit: float
    pair: ModelPair  # read once when the item opened: its crops are embedded and searched with it
    final: int = 0  # on an item's last crop: how many it had in all (no Close message follows)
    crop: npt.NDArray[np.uint8] | None = None  # the crop embedded (a reference: kept for feedback)


@dataclass(frozen=True, slots=True)
class Embedded:
    pending: Pending
    vector: npt.NDArray[np.float32] | None
    t_done: float


@dataclass(frozen=True, slots=True)
class Close:
    """No more crops will be submitted for ``item_id``: ``submitted`` in total. Sent when an item ends
    before its last crop (the detector closed it, or the stream ended); a last crop says so itself
    (``Pending.final``) and no Close follows it."""

    item_id: int
    submitted: int


Handoff = Embedded | Close


@dataclass
class Counters:
    """Frame and item counters (written by one stage each, read by health)."""

    frames_processed: int = 0
    crops_submitted: int = 0
    embed_errors: int = 0
    items: int = 0
    results: int = 0
    no_snapshot: int = 0


class DetectStage:
    """Frames -> detector -> steady crops submitted for embedding; tells the search stage when items close."""

    def __init__(
        self,
        frames: BoundedQueue[Frame],
        detector: DetectorPort,
        pairs: PairProvider,
        handoff: BoundedQueue[Handoff],
        inflight: threading.Semaphore,
        *,
        max_inflight: int,
        aggregate_frames: int,
        mirror_frame: bool = False,
        counters: Counters,
        on_frame: Callable[[Frame, Detection], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        inline: Callable[[Handoff], None] | None = None,
    ) -> None:
        self._frames = frames
        self._detector = detector
        self._pairs = pairs
        self._handoff = handoff
        # Inline (one thread): crops are embedded on this thread and handed straight to the search
        # stage's ``handle``; else submitted to the embedder's own threads and queued to the search thread.
        self._inline = inline
        self._inflight = inflight
        self._max_inflight = max_inflight
        self._aggregate = aggregate_frames
        # The second steady crop of an item is embedded mirrored: a free extra view of the item, since its
        # steady frames are near-copies of each other (grocery, 3 frames: +0.7-1.7 R@1 points at one
        # store photo per product; docs/NOTES.md). The crop kept for feedback is never the mirrored one.
        self._mirror_at = 1 if mirror_frame and aggregate_frames >= 2 else -1
        self._counters = counters
        self._on_frame = on_frame
        self._clock = clock
        self._submitted: dict[int, int] = {}  # open items -> crops submitted so far
        self._item_pair: dict[int, ModelPair] = {}  # open items -> the pair read at their first crop
        self._closed_ids: set[int] = set()  # items already answered (or given up): submit no more
        self.last_processed_t: float | None = None
        self.max_gap_s = 0.0  # longest wait between two processed frames (swap benchmark)

    def embedders_in_use(self) -> list[object]:
        """The embedders of items still open (any thread): a model retired by an update stays open for
        them. ``dict.copy`` is one atomic step under the GIL, so the detect thread may go on meanwhile."""
        return [pair.embedder for pair in self._item_pair.copy().values()]

    def run(self, stop: threading.Event) -> None:
        """Process frames until END or ``stop``; at END wait for in-flight crops, then pass END on."""
        try:
            while not stop.is_set():
                frame = self._frames.get(_GET_TIMEOUT_S)
                if frame is None:
                    continue
                if frame is END:
                    self._close_all(stop)
                    self._drain_inflight(stop)
                    break
                assert isinstance(frame, Frame)
                try:
                    self._process(frame, stop)
                except Exception:
                    _LOGGER.exception("frame %d failed in detection; skipped", frame.seq)
        finally:
            self._handoff.close()

    def _process(self, frame: Frame, stop: threading.Event) -> None:
        t0 = self._clock()
        det = self._detector.update(frame.image)
        t1 = self._clock()
        c = self._counters
        c.frames_processed += 1
        if self.last_processed_t is not None:
            self.max_gap_s = max(self.max_gap_s, t1 - self.last_processed_t)
        self.last_processed_t = t1
        if self._on_frame is not None:
            self._on_frame(frame, det)
        if det.closed is not None:
            self._close(det.closed, stop)
        if det.state is not DetectState.STEADY or det.crop is None:
            return
        n = self._submitted.get(det.item_id)
        if n is None:
            if det.item_id in self._closed_ids:
                return
            n = self._submitted[det.item_id] = 0
            self._item_pair[det.item_id] = self._pairs()
            c.items += 1
        if n >= self._aggregate:
            return
        if not self._acquire(stop):
            return
        pair = self._item_pair[det.item_id]
        final = n + 1 if n + 1 >= self._aggregate else 0
        pending = Pending(det.item_id, frame.seq, frame.t_capture, (t0 - frame.t_capture) * 1000.0,
                          (t1 - t0) * 1000.0, self._clock(), pair, final, det.crop)
        crop: npt.NDArray[np.uint8] = det.crop
        if n == self._mirror_at:
            crop = np.ascontiguousarray(crop[:, ::-1])
        try:
            if self._inline is None:
                submit(pair.embedder, crop, self._on_embedded, pending)
            else:
                self._embed_inline(pair.embedder, crop, pending)
        except Exception:
            self._inflight.release()
            c.embed_errors += 1
            _LOGGER.exception("embedding submit failed for frame %d", frame.seq)
            return  # the item stays open: its next steady frame tries again
        c.crops_submitted += 1
        if final:
            self._forget(det.item_id)  # its last crop carries the count: one hand-off fewer per item
        else:
            self._submitted[det.item_id] = n + 1

    def _embed_inline(self, embedder: EmbedderPort, crop: npt.NDArray[np.uint8], pending: Pending) -> None:
        """Embed on this thread (the GIL is released while OpenVINO runs) and search right away."""
        try:
            vector: npt.NDArray[np.float32] | None = embed_one(embedder, crop)
        except Exception:
            _LOGGER.exception("embedding failed")
            vector = None
        self._on_embedded(vector, pending)

    def _close(self, item_id: int, stop: threading.Event) -> None:
        n = self._forget(item_id)
        if n is None:
            return
        if self._inline is None:
            self._handoff.put(Close(item_id, n), stop)
        else:
            self._inline(Close(item_id, n))

    def _forget(self, item_id: int) -> int | None:
        """Drop an open item (no more crops for it); the crops it had submitted, None if not open."""
        n = self._submitted.pop(item_id, None)
        self._item_pair.pop(item_id, None)
        if n is None:
            return None
        self._closed_ids.add(item_id)
        if len(self._closed_ids) > 1024:  # ids only grow: forget all but the recent ones
            self._closed_ids = {i for i in self._closed_ids if i > item_id - 64}
        return n

    def _close_all(self, stop: threading.Event) -> None:
        for item_id in list(self._submitted):
            self._close(item_id, stop)

    def _acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self._inflight.acquire(timeout=_GET_TIMEOUT_S):
                return True
        return False

    def _drain_inflight(self, stop: threading.Event) -> None:
        """Take every slot back: all submitted crops have reached the search stage."""
        taken = 0
        while taken < self._max_inflight and self._acquire(stop):
            taken += 1
        for _ in range(taken):
            self._inflight.release()

    def _on_embedded(self, vector: npt.NDArray[np.float32] | None, userdata: object) -> None:
        """Embedder callback (an OpenVINO thread, or this thread inline): hand the vector to the search
        stage."""
        assert isinstance(userdata, Pending)
        msg = Embedded(userdata, vector, self._clock())
        if self._inline is None:
            self._handoff.put(msg)
        else:
            self._inline(msg)


@dataclass
class _Open:
    vectors: list[npt.NDArray[np.float32]] = field(default_factory=list)
    received: int = 0
    expected: int | None = None
    last: Embedded | None = None


class SearchStage:
    """Embedded crops -> per-item aggregation -> one ItemResult per held item (``on_result``)."""

    def __init__(
        self,
        handoff: BoundedQueue[Handoff],
        inflight: threading.Semaphore,
        pairs: PairProvider,
        *,
        top_k: int,
        counters: Counters,
        stats: LatencyStats,
        on_result: Callable[[ItemResult], None],
        on_shown: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handoff = handoff
        self._inflight = inflight
        self._pairs = pairs
        self._k = top_k
        self._counters = counters
        self._stats = stats
        self._on_result = on_result
        self._on_shown = on_shown
        self._clock = clock
        self._open: dict[int, _Open] = {}

    def run(self, stop: threading.Event) -> None:
        """Aggregate until END or ``stop``."""
        while not stop.is_set():
            msg = self._handoff.get(_GET_TIMEOUT_S)
            if msg is None:
                continue
            if msg is END:
                break
            self.handle(msg)  # type: ignore[arg-type]

    def handle(self, msg: Handoff) -> None:
        """One embedded crop or Close (from the search thread, or inline from the detect thread)."""
        try:
            self._handle(msg)
        except Exception:
            _LOGGER.exception("search stage failed on %r; item skipped", type(msg).__name__)

    def _handle(self, msg: Handoff) -> None:
        if isinstance(msg, Embedded):
            self._inflight.release()
            st = self._open.setdefault(msg.pending.item_id, _Open())
            st.received += 1
            if msg.pending.final:
                st.expected = msg.pending.final
            if msg.vector is None or not np.all(np.isfinite(msg.vector)):
                self._counters.embed_errors += 1
            else:
                st.vectors.append(msg.vector)
                st.last = msg
            item_id = msg.pending.item_id
        else:
            st = self._open.setdefault(msg.item_id, _Open())
            st.expected = msg.submitted
            item_id = msg.item_id
        if st.expected is not None and st.received >= st.expected:
            del self._open[item_id]
            self._finish(item_id, st)

    def _finish(self, item_id: int, st: _Open) -> None:
        if not st.vectors or st.last is None:
            return
        pair = st.last.pending.pair
        now = self._pairs()
        if now.model_id == pair.model_id:
            pair = now  # same model: the freshest snapshot (a swap while the item was held)
        snap = pair.snapshot
        if snap is None:
            self._counters.no_snapshot += 1
            _LOGGER.warning("item %d: no snapshot loaded, cannot answer", item_id)
            self._on_shown(item_id)
            return
        t0 = self._clock()
        hits, agreement = aggregate(st.vectors, snap, self._k)
        t1 = self._clock()
        last = st.last
        p = last.pending
        matched = bool(hits) and snap.rule.is_match([h.score for h in hits])
        matched = matched and not snap.not_carried(st.vectors, hits[0].score)
        latency = {
            "capture": round(p.capture_ms, 3),
            "detect": round(p.detect_ms, 3),
            "embed": round((last.t_done - p.t_submit) * 1000.0, 3),
            "search": round((t1 - t0) * 1000.0, 3),
            "total": round((t1 - p.t_capture) * 1000.0, 3),
        }
        self._stats.add_many(latency)
        result = ItemResult(item_id, matched, tuple(hits), snap.threshold, len(st.vectors), snap.version,
                            agreement, p.t_capture, latency, model_id=pair.model_id,
                            snapshot_dir=snap.directory, crop=p.crop, vectors=tuple(st.vectors))
        self._counters.results += 1
        try:
            self._on_result(result)
        finally:
            self._on_shown(item_id)
