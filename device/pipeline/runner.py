"""The frame pipeline: detect+submit and search stages on their threads, one stop event, counters."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from device.camera.buffer import BoundedQueue, Frame, OverflowPolicy
from device.comms.stats import LatencyStats
from device.detect.detector import Detection, DetectorPort
from device.pipeline.aggregate import ItemResult
from device.pipeline.stages import (
    Counters,
    DetectStage,
    Handoff,
    ModelPair,
    PairProvider,
    SearchStage,
)
from device.sync.active import ActiveSnapshot
from models.port import EmbedderPort

_LOGGER = logging.getLogger(__name__)

_FPS_WINDOW_S: Final = 5.0  # fps is averaged over this window: steadier than per-second, still live
_HANDOFF_SPARE: Final = 64  # Close messages beside the (semaphore-bounded) vectors in the hand-off queue


def limit_blas_threads() -> None:
    """Run numpy's BLAS on one thread in this process (the kiosk's composition root calls it).

    The per-query projection (a 2048x256 matmul for ResNet-50) made OpenBLAS wake its own threads, which
    then spin beside OpenVINO's two: ResNet-50 int8 through the pipeline fell from 168 to 97 frames/s.
    The kiosk's numpy work is one vector at a time, where threads only cost.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class Pipeline:
    """Owns the detect and search stages; the camera's queue is its input, ``on_result`` its output.

    ``Pipeline(frames, detector, embedder, snapshot)`` serves one fixed model; ``Pipeline.of_pairs``
    reads the (model, snapshot) pair from a provider once per held item, so both can be switched."""

    def __init__(
        self,
        frames: BoundedQueue[Frame],
        detector: DetectorPort,
        embedder: EmbedderPort,
        snapshot: Callable[[], ActiveSnapshot | None],
        **kwargs: Any,
    ) -> None:
        self._build(frames, detector, lambda: ModelPair(embedder, snapshot()), **kwargs)

    @classmethod
    def of_pairs(
        cls, frames: BoundedQueue[Frame], detector: DetectorPort, pairs: PairProvider, **kwargs: Any
    ) -> Pipeline:
        """A pipeline whose model and snapshot come from ``pairs()`` (one reference, swapped whole)."""
        self = cls.__new__(cls)
        self._build(frames, detector, pairs, **kwargs)
        return self

    def _build(
        self,
        frames: BoundedQueue[Frame],
        detector: DetectorPort,
        pairs: PairProvider,
        *,
        on_result: Callable[[ItemResult], None],
        on_frame: Callable[[Frame, Detection], None] | None = None,
        aggregate_frames: int = 3,
        mirror_frame: bool = False,
        top_k: int = 5,
        max_inflight: int = 2,
        stats: LatencyStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        inline: bool = False,
    ) -> None:
        self.inline = inline
        self.counters = Counters()
        self.stats = stats or LatencyStats()
        self._clock = clock
        self._stop = threading.Event()
        self.done = threading.Event()  # set when both stages have finished (END reached or stopped)
        self._threads: list[threading.Thread] = []
        self._rate: deque[tuple[float, int]] = deque()
        self._rate_lock = threading.Lock()
        self._finished = 0
        inflight = threading.Semaphore(max_inflight)
        handoff: BoundedQueue[Handoff] = BoundedQueue(max_inflight + _HANDOFF_SPARE, OverflowPolicy.WAIT,
                                                      "handoff")
        self._frames = frames
        self.search = SearchStage(
            handoff, inflight, pairs, top_k=top_k, counters=self.counters, stats=self.stats,
            on_result=on_result, on_shown=detector.mark_result_shown, clock=clock,
        )
        self.detect = DetectStage(
            frames, detector, pairs, handoff, inflight, max_inflight=max_inflight,
            aggregate_frames=aggregate_frames, mirror_frame=mirror_frame, counters=self.counters,
            on_frame=on_frame, clock=clock,
            inline=self.search.handle if inline else None,
        )

    def start(self) -> None:
        """Start both stage threads."""
        if self._threads:
            raise RuntimeError("pipeline already started")
        stages: list[tuple[str, DetectStage | SearchStage]] = [("pipeline-detect", self.detect)]
        if not self.inline:
            stages.append(("pipeline-search", self.search))
        for name, stage in stages:
            t = threading.Thread(target=self._run, args=(stage,), name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, stage: DetectStage | SearchStage) -> None:
        try:
            stage.run(self._stop)
        except Exception:
            _LOGGER.exception("%s crashed", type(stage).__name__)
        finally:
            with self._rate_lock:
                self._finished += 1
                if self._finished == len(self._threads):
                    self.done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the stages to finish on their own (a file source's END); True if they did."""
        return self.done.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Set the stop event, wake the stages with END, join; log any stage still alive."""
        self._stop.set()
        self._frames.close()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                _LOGGER.error("pipeline thread %s still alive after %.1f s", t.name, timeout_s)
        self.done.set()

    def embedders_in_use(self) -> list[object]:
        """The embedders that items still open will embed their next crops with."""
        return self.detect.embedders_in_use()

    def fps(self) -> float:
        """Processed frames per second over the last few seconds."""
        now = self._clock()
        n = self.counters.frames_processed
        with self._rate_lock:
            self._rate.append((now, n))
            while len(self._rate) > 2 and now - self._rate[0][0] > _FPS_WINDOW_S:
                self._rate.popleft()
            t0, n0 = self._rate[0]
        return (n - n0) / (now - t0) if now > t0 else 0.0
