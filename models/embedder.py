"""The embedding runtime both kiosk and cloud use: a verified bundle compiled with OpenVINO.

Concurrency design (no ``AsyncInferQueue``), from failures measured on these 2-core machines: infer
requests that specialise a dynamic input shape concurrently can deadlock inside OpenVINO
(ultralytics#25923), and Python callbacks on OpenVINO threads deadlocked ``close()`` (a worker waiting for
the GIL while the model's destructor joined it). So the Embedder compiles the bundle with a *static*
input (the recipe size over its centre crop), resizes each crop to it on the host (cv2 INTER_LINEAR, as
the graph would; the rest of the in-graph preprocessing still runs), and drives a fixed pool of infer
requests from its own threads with synchronous ``infer()`` (it releases the GIL).
``latency`` (the kiosk, one camera): one stream, one request. ``throughput`` (catalog builds): OpenVINO's
THROUGHPUT hint (2 streams here) and its optimal number of requests, each on its own thread: 1.3-1.5x the
images/s of one stream. Both give the same vector for the same crop, which is what lets a catalog built in
the cloud be searched by kiosks: a quantized source's int8 weights left behind Convert/Multiply chains broke
that in 2-stream compiles (export now folds them, see models/graph.py); a bundle that still has them runs
one stream in every mode.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import cv2
import numpy as np

from models.bundle import BundleManifest, input_hw, verify_bundle
from models.errors import BadImage, ModelError
from models.graph import has_unfolded_int_weights

_LOGGER = logging.getLogger(__name__)

REQUESTS_PER_STREAM = 2  # throughput mode: one request running and one queued per stream (see __init__)

Mode = Literal["latency", "throughput"]


def check_crop(crop: Any) -> np.ndarray:
    """A uint8 HxWx3 array, or BadImage saying what is wrong."""
    if not isinstance(crop, np.ndarray):
        raise BadImage(f"crop must be a numpy array, got {type(crop).__name__}")
    if crop.dtype != np.uint8:
        raise BadImage(f"crop must be uint8 BGR, got dtype {crop.dtype}")
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise BadImage(f"crop must be HxWx3 BGR, got shape {crop.shape}")
    if crop.shape[0] < 1 or crop.shape[1] < 1:
        raise BadImage(f"crop is empty: shape {crop.shape}")
    return crop


def fit_to_input(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """The crop resized to the model's input size, C-contiguous."""
    h, w = crop.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(crop)
    # INTER_LINEAR, like the graph's own resize (so quality figures carry over); INTER_AREA antialiases
    # (+1-2 points recall@1 on grocery) but costs 0.6 ms vs 0.09 ms per crop on the kiosk's hot path.
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)


_CORE_LOCK = threading.Lock()  # two first callers at once must not make two Cores


def shared_core() -> Any:
    """The process's one OpenVINO Core, kept until exit; every Embedder compiles with it.

    OpenVINO's CPU plugin gives the thread that first compiles with a Core an alternate signal stack of
    its own, and unmaps it when that Core's plugin is destroyed, on whichever thread that happens. With a
    Core per Embedder, a model closed off the thread that made it (a kiosk retiring a replaced model)
    left that thread's alternate stack dangling, and the next SIGTERM killed the process with SIGSEGV
    (``si_code`` SI_KERNEL: no stack to run the handler on). One Core keeps the plugin, and that stack,
    alive; closing a model frees the model only. (A process-wide object on purpose, against the house
    rule: OpenVINO's plugin state is process-wide already; the one-Core-per-application use it documents.)
    """
    with _CORE_LOCK:
        return _make_core()


@functools.cache
def _make_core() -> Any:
    import openvino as ov

    return ov.Core()


def _unit(vec: np.ndarray) -> np.ndarray:
    """Re-normalise in float32 (the graph already does; this removes fp16 drift in the last bits)."""
    out = np.array(vec, dtype=np.float32, copy=True)
    n = float(np.linalg.norm(out))
    if n > 0:
        out /= n
    return out


class Embedder:
    """Loads a bundle, verifies it, compiles it; embeds uint8 BGR crops of any size into unit vectors."""

    def __init__(
        self,
        bundle_dir: Path,
        *,
        mode: Mode = "latency",
        cache_dir: Path | None = None,
        device: str = "CPU",
        num_requests: int | None = None,
        threads: int | None = None,
    ) -> None:
        import openvino as ov

        if mode not in ("latency", "throughput"):
            raise ValueError(f"mode must be 'latency' or 'throughput', got {mode!r}")
        self.manifest: BundleManifest = verify_bundle(Path(bundle_dir))
        self.dim: int = self.manifest.dim
        self.model_id: str = self.manifest.model_id
        self.preprocessing_hash: str = self.manifest.preprocessing_hash
        self.mode: Mode = mode
        # Crops are pre-sized on the host to the graph's static input (recipe size / centre crop share).
        self.input_hw: tuple[int, int] = input_hw(self.manifest.preprocessing)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": mode.upper(),
            # The precision the catalog was built with; OpenVINO would otherwise pick bf16 where it can.
            "INFERENCE_PRECISION_HINT": self.manifest.inference_precision,
        }
        if threads is not None:  # a share of a machine (a Ray actor's CPUs): never more threads than cores
            config["INFERENCE_NUM_THREADS"] = max(1, threads)
            # ... and never pinned: OpenVINO pins a latency-hint model's threads to cores chosen without
            # regard to other processes, so two 1-thread actors landed on the SAME core (2 processes x
            # MobileNetV2, 1 thread each: 37.8 + 37.8 img/s pinned, 77.3 + 70.4 unpinned; 2 cores).
            config["ENABLE_CPU_PINNING"] = False
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        core = shared_core()
        try:
            model = core.read_model(str(Path(bundle_dir) / "model.xml"))
            if mode == "latency" or has_unfolded_int_weights(model):
                # One camera wants one stream; and 2-stream compiles of unfolded int8 weights are wrong.
                config["NUM_STREAMS"] = 1
                if mode == "throughput":
                    _LOGGER.warning("%s keeps int8 weights unfolded (an older export): one stream only; "
                                    "re-export it for full catalog-build speed", bundle_dir)  # fmt: skip
            h, w = self.input_hw
            model.reshape({model.inputs[0]: ov.PartialShape([1, h, w, 3])})
            self._compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise ModelError(f"OpenVINO could not compile {bundle_dir} on {device}: {exc}") from exc
        self.streams: int = int(self._compiled.get_property("NUM_STREAMS"))
        # Each request is driven by its own thread. One stream: one request, more only contend
        # (MobileNetV2: 190 img/s with 1, 170-182 with 2-4); submit() still overlaps the caller. Several
        # streams: two requests each, so a stream has the next one queued while Python collects the last
        # (2 streams, 4 vs 2 requests, 4 interleaved rounds: ResNet-50 int8 249 vs 245 img/s, MobileNetV2
        # 260 vs 252, benchmark_app 254 / 262; 4 requests ahead in all 8 pairs).
        if num_requests is None:
            optimal = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            num_requests = 1 if self.streams == 1 else REQUESTS_PER_STREAM * optimal
        self.num_requests: int = max(1, num_requests)
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        warm = np.zeros((1, *self.input_hw, 3), np.uint8)
        for _ in range(self.num_requests):
            request = self._compiled.create_infer_request()
            request.infer({0: warm})  # warm each request serially, never concurrently
            self._idle.put(request)
        self._pool = ThreadPoolExecutor(self.num_requests, thread_name_prefix="embedder")
        self._submitted = 0  # crops submitted whose callback has not returned yet
        self._settled = threading.Condition()
        self._closed = False
        _LOGGER.info(
            "embedder %s: model %s dim %d %s, %s hint, %d streams, %d requests",
            self.manifest.name,
            self.model_id[:12],
            self.dim,
            self.manifest.precision,
            mode,
            self.streams,
            self.num_requests,
        )

    def _infer(self, crop: np.ndarray) -> np.ndarray:
        """One inference on an idle request (blocks for one if all are busy); runs on any thread."""
        arr = fit_to_input(crop, *self.input_hw)[None]
        request = self._idle.get()
        try:
            request.infer({0: arr}, share_inputs=True)  # releases the GIL while it runs
            return _unit(request.get_output_tensor(0).data[0])
        finally:
            self._idle.put(request)

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError("embedder is closed")

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit rows in the order of ``crops``; requests overlap for throughput."""
        self._check_open()
        arrays = [check_crop(c) for c in crops]
        if not arrays:
            return np.empty((0, self.dim), dtype=np.float32)
        out = np.empty((len(arrays), self.dim), dtype=np.float32)
        lanes = min(self.num_requests, len(arrays))
        if lanes == 1:
            self._infer_lane(arrays, out, 0, 1)
            return out
        # One task per request, each looping over every lanes-th crop: no future or queue hand-off per
        # crop (ResNet-50 int8: 0.915 -> 1.00 of benchmark_app's throughput, bench/models.py).
        for f in [self._pool.submit(self._infer_lane, arrays, out, k, lanes) for k in range(lanes)]:
            f.result()
        return out

    def _infer_lane(self, arrays: list[np.ndarray], out: np.ndarray, first: int, step: int) -> None:
        """Embed arrays[first::step] into the same rows of ``out`` on one request."""
        request = self._idle.get()
        try:
            for i in range(first, len(arrays), step):
                request.infer({0: fit_to_input(arrays[i], *self.input_hw)[None]}, share_inputs=True)
                out[i] = _unit(request.get_output_tensor(0).data[0])
        finally:
            self._idle.put(request)

    def embed_one(self, crop: np.ndarray) -> np.ndarray:
        """(dim,) float32 unit vector, computed on the calling thread (the kiosk's latency path)."""
        self._check_open()
        return self._infer(check_crop(crop))

    def submit(
        self,
        crop: np.ndarray,
        callback: Callable[[np.ndarray | None, object], None],
        userdata: object = None,
    ) -> None:
        """Queue one crop; ``callback(vector, userdata)`` runs on an embedder thread when it is done.

        ``vector`` is None when the inference failed (logged): the caller learns of every crop it gave.
        The crop is copied (resized) before this returns, so the caller may reuse its frame buffer.
        """
        self._check_open()
        crop = check_crop(crop)
        arr = fit_to_input(crop, *self.input_hw)
        if arr.shape[:2] == crop.shape[:2]:  # not resized: still the caller's buffer (or a view of it)
            arr = arr.copy()
        with self._settled:
            self._submitted += 1
        self._pool.submit(self._run_submitted, arr, callback, userdata)

    def _run_submitted(
        self, arr: np.ndarray, callback: Callable[[np.ndarray | None, object], None], userdata: object
    ) -> None:
        try:
            vec: np.ndarray | None = None
            try:
                vec = self._infer(arr)
            except Exception:
                _LOGGER.exception("embedding failed")
            try:
                callback(vec, userdata)
            except Exception:
                _LOGGER.exception("embedding callback failed")
        finally:
            with self._settled:
                self._submitted -= 1
                if self._submitted == 0:
                    self._settled.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted crop's callback has returned; False on timeout."""
        with self._settled:
            return self._settled.wait_for(lambda: self._submitted == 0, timeout)

    def close(self) -> None:
        """Finish in-flight work and release the compiled model."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        while not self._idle.empty():
            self._idle.get()
        del self._compiled

    def __enter__(self) -> Embedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
