"""The embedding runtime both kiosk and cloud use: a verified bundle compiled with OpenVINO."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from models.bundle import BundleManifest, verify_bundle
from models.errors import BadImage, ModelError

_LOGGER = logging.getLogger(__name__)

Mode = Literal["latency", "throughput"]


def check_crop(crop: Any) -> np.ndarray:
    """A C-contiguous uint8 HxWx3 array, or BadImage saying what is wrong."""
    if not isinstance(crop, np.ndarray):
        raise BadImage(f"crop must be a numpy array, got {type(crop).__name__}")
    if crop.dtype != np.uint8:
        raise BadImage(f"crop must be uint8 BGR, got dtype {crop.dtype}")
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise BadImage(f"crop must be HxWx3 BGR, got shape {crop.shape}")
    if crop.shape[0] < 1 or crop.shape[1] < 1:
        raise BadImage(f"crop is empty: shape {crop.shape}")
    return np.ascontiguousarray(crop)


def _unit(vec: np.ndarray) -> np.ndarray:
    """Re-normalise rows in float32 (the graph already does; this removes fp16 drift in the last bits)."""
    out = np.asarray(vec, dtype=np.float32).copy()
    norms = np.linalg.norm(out, axis=-1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
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
    ) -> None:
        import openvino as ov

        if mode not in ("latency", "throughput"):
            raise ValueError(f"mode must be 'latency' or 'throughput', got {mode!r}")
        self.manifest: BundleManifest = verify_bundle(Path(bundle_dir))
        self.dim: int = self.manifest.dim
        self.model_id: str = self.manifest.model_id
        self.preprocessing_hash: str = self.manifest.preprocessing_hash
        self.mode: Mode = mode
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": mode.upper(),
            # The precision the catalog was built with; OpenVINO would otherwise pick bf16 where it can.
            "INFERENCE_PRECISION_HINT": self.manifest.inference_precision,
        }
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        core = ov.Core()
        try:
            self._compiled = core.compile_model(str(Path(bundle_dir) / "model.xml"), device, config)
        except RuntimeError as exc:
            raise ModelError(f"OpenVINO could not compile {bundle_dir} on {device}: {exc}") from exc
        optimal = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.num_requests: int = max(1, num_requests if num_requests is not None else optimal)
        self._queue = ov.AsyncInferQueue(self._compiled, self.num_requests)
        self._queue.set_callback(self._on_done)
        self._sync_request = self._compiled.create_infer_request()
        self._sync_lock = threading.Lock()
        self._embed_lock = threading.Lock()
        self._closed = False
        _LOGGER.info(
            "embedder %s: model %s dim %d %s, %s hint, %d requests",
            self.manifest.name,
            self.model_id[:12],
            self.dim,
            self.manifest.precision,
            mode,
            self.num_requests,
        )

    @staticmethod
    def _on_done(request: Any, userdata: Any) -> None:
        # Runs on an OpenVINO thread; exceptions here would be lost, so the callers' callbacks are guarded.
        sink, key, _keepalive = userdata
        vec = _unit(request.get_output_tensor(0).data[0])
        try:
            sink(vec, key)
        except Exception:
            _LOGGER.exception("embedding callback failed")

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError("embedder is closed")

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit rows in the order of ``crops``; requests overlap for throughput."""
        self._check_open()
        arrays = [check_crop(c) for c in crops]
        out = np.empty((len(arrays), self.dim), dtype=np.float32)
        if not arrays:
            return out

        def sink(vec: np.ndarray, index: object) -> None:
            assert isinstance(index, int)
            out[index] = vec

        with self._embed_lock:
            for i, arr in enumerate(arrays):
                # share_inputs: no copy; ``arrays`` keeps every crop alive until wait_all returns.
                self._queue.start_async({0: arr[None]}, (sink, i, None), share_inputs=True)
            self._queue.wait_all()
        return out

    def embed_one(self, crop: np.ndarray) -> np.ndarray:
        """(dim,) float32 unit vector from one synchronous request (the kiosk's latency path)."""
        self._check_open()
        arr = check_crop(crop)
        with self._sync_lock:
            self._sync_request.infer({0: arr[None]}, share_inputs=True)
            return _unit(self._sync_request.get_output_tensor(0).data[0])

    def submit(
        self, crop: np.ndarray, callback: Callable[[np.ndarray, object], None], userdata: object = None
    ) -> None:
        """Queue one crop; ``callback(vector, userdata)`` runs on an OpenVINO thread when it is done."""
        self._check_open()
        arr = check_crop(crop)
        # Our own copy, since the caller may reuse its frame buffer as soon as we return; it rides along in
        # userdata to stay alive until the request is done. (share_inputs=False fails on dynamic shapes:
        # OpenVINO tries to reuse the previous request's tensor and cannot grow it.)
        own = arr[None].copy()
        self._queue.start_async({0: own}, (callback, userdata, own), share_inputs=True)

    def wait(self) -> None:
        """Block until every submitted crop has been embedded and its callback has run."""
        if not self._closed:
            self._queue.wait_all()

    def close(self) -> None:
        """Finish in-flight work and release the compiled model."""
        if self._closed:
            return
        self._queue.wait_all()
        self._closed = True
        del self._queue, self._sync_request, self._compiled

    def __enter__(self) -> Embedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
