"""int8 vs fp16 MobileNetV2 on real grocery photos: embeddings agree and retrieval (protocol B) holds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cloud.retrieval import item_scores
from models.embedder import REQUESTS_PER_STREAM, Embedder
from tests.conftest import shared_path
from tests.models.grocery import N_ITEMS, load_iconic, load_split, recall_at_1

_LOGGER = logging.getLogger(__name__)


def _cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    flags = next((line.split(":", 1)[1].split() for line in lines), [])
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# Without VNNI, OpenVINO's int8 kernels take another path (AVX2 u8 x s8 pairs summed in int16), and the
# same int8 bundle strays further from fp16. Measured on an AVX2-only EPYC (2026-12-06): cosine min 0.963
# / mean 0.984, R@1 0.598 vs 0.578 fp16, class-level 0.615 vs 0.632; NNCF's overflow fix made it worse
# (min 0.929 enabled, 0.933 disabled). With VNNI (earlier machines): min 0.991 / mean 0.998, within 0.7 pt.
VNNI = _cpu_has_vnni()
COSINE_MIN, COSINE_MEAN, RECALL_GAP = (0.98, 0.99, 0.01) if VNNI else (0.95, 0.98, 0.025)


@pytest.mark.slow
@pytest.mark.shared
def test_int8_matches_fp16_on_grocery(mobilenet_bundles: dict[str, Path]) -> None:
    """int8 must not lose search quality: cosine >= 0.98 to fp16, protocol B R@1 within 1 point (on a CPU
    with VNNI; without it the bounds above), and plain features reach the issue's 0.60 when an item scores
    the mean of its 5 nearest photos."""
    root = shared_path("data", "grocery")
    val, train, iconic = load_split(root, "val.txt"), load_split(root, "train.txt"), load_iconic(root)
    catalog = train.images + iconic.images
    catalog_labels = np.concatenate([train.labels, iconic.labels])
    queries: dict[str, np.ndarray] = {}
    recall: dict[str, float] = {}
    item_recall: dict[str, float] = {}
    for precision, bundle in mobilenet_bundles.items():
        # As the product runs them: the kiosk embeds the query (latency), the cloud build the catalog
        # (throughput; 7.0 vs 9.1 ms an image here, and test_throughput_after_latency_embedder below
        # holds the two modes to the same vectors).
        with Embedder(bundle, mode="latency") as embedder:
            queries[precision] = embedder.embed(val.images)
        with Embedder(bundle, mode="throughput") as embedder:
            items = embedder.embed(catalog)
        recall[precision] = recall_at_1(queries[precision], val.labels, items, catalog_labels)
        scores = item_scores(queries[precision] @ items.T, catalog_labels, N_ITEMS, per_item=5)
        item_recall[precision] = float(np.mean(scores.argmax(1) == val.labels))
    cosines = np.sum(queries["fp16"] * queries["int8"], axis=1)
    _LOGGER.info("R@1 %s, class-level %s; int8-fp16 cosine min %.4f mean %.4f", recall, item_recall,
                 cosines.min(), cosines.mean())
    assert cosines.min() >= COSINE_MIN, (VNNI, cosines.min())
    assert cosines.mean() >= COSINE_MEAN, (VNNI, cosines.mean())
    assert abs(recall["int8"] - recall["fp16"]) <= RECALL_GAP + 1e-9
    # Plain pooled features of this MobileNetV2 with the recipe's centre crop, nearest photo: 0.578 fp16 /
    # 0.571 int8 measured (0.534 without the crop). Scoring an item by the mean of its 5 nearest photos
    # (class-level, brute force): 0.632 / 0.632, the "roughly 0.64" baseline #6 quotes (docs/NOTES.md).
    assert min(recall.values()) >= 0.56
    assert min(item_recall.values()) >= 0.60
    assert abs(item_recall["int8"] - item_recall["fp16"]) <= RECALL_GAP + 1e-9


@pytest.mark.slow
@pytest.mark.shared
def test_throughput_after_latency_embedder(mobilenet_bundles: dict[str, Path]) -> None:
    """Guards cloud and kiosk disagreeing: with OpenVINO's AsyncInferQueue, a THROUGHPUT embedder made after
    a closed LATENCY one returned other vectors (cosine ~0.15). Every mode must give the same vector."""
    root = shared_path("data", "grocery")
    images = load_split(root, "val.txt").images[:40]
    with Embedder(mobilenet_bundles["fp16"], mode="latency") as embedder:
        want = np.stack([embedder.embed_one(img) for img in images])
    for _ in range(3):
        with Embedder(mobilenet_bundles["fp16"], mode="throughput") as embedder:
            got = embedder.embed(images)
        assert float(np.sum(want * got, axis=1).min()) > 0.999


@pytest.mark.slow
@pytest.mark.shared
def test_two_streams_agree_with_one(mobilenet_bundles: dict[str, Path]) -> None:
    """Guards OpenVINO's int8-weight decompression bug: a quantized TFLite exported with its weights left
    behind Convert/Multiply chains gave wrong vectors (cosine 0.0-0.3, NaNs) in 2-stream compiles. Export
    folds them into float constants; two concurrent requests on a 2-stream compile must match 1 stream."""
    import threading

    import openvino as ov

    root = shared_path("data", "grocery")
    images = load_split(root, "val.txt").images[:24]
    with Embedder(mobilenet_bundles["fp16"], mode="latency") as embedder:
        want = embedder.embed(images)
        size = embedder.input_hw
    core = ov.Core()
    import cv2

    inputs = [cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)[None] for img in images]
    for _ in range(3):  # the failure differed from compile to compile
        compiled = core.compile_model(
            str(mobilenet_bundles["fp16"] / "model.xml"), "CPU",
            {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2, "INFERENCE_PRECISION_HINT": "f32"},
        )  # fmt: skip
        got = np.zeros_like(want)
        requests = [compiled.create_infer_request() for _ in range(2)]

        def work(k: int, got: np.ndarray = got, requests: list = requests) -> None:  # type: ignore[type-arg]
            for i in range(k, len(inputs), 2):
                requests[k].infer({0: inputs[i]})
                got[i] = requests[k].get_output_tensor(0).data[0]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert float(np.sum(want * got, axis=1).min()) > 0.999


@pytest.mark.slow
@pytest.mark.shared
def test_throughput_mode_runs_two_streams_only_when_safe(
    mobilenet_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Catalog builds get OpenVINO's 2 streams (1.3x images/s) only where they are right: a bundle whose
    int8 weights are still unfolded (an older export) must fall back to one stream, and say so."""
    import os

    from models.bundle import write_bundle
    from models.export import load_source, recipe
    from models.graph import (
        add_preprocessing,
        cut_at_pool,
        has_unfolded_int_weights,
        stable_names,
        strip_fake_quantize,
    )

    with Embedder(mobilenet_bundles["fp16"], mode="throughput") as embedder:
        streams = embedder.streams
        assert streams == min(2, os.cpu_count() or 1)
        assert embedder.num_requests == (1 if streams == 1 else REQUESTS_PER_STREAM * streams)
    with Embedder(mobilenet_bundles["fp16"], mode="latency") as embedder:
        assert (embedder.streams, embedder.num_requests) == (1, 1)
    loaded = load_source(str(shared_path("models", "coral", "tf2_mobilenet_v2_1.0_224_ptq.tflite")))
    strip_fake_quantize(stable_names(loaded.model))
    cut, _ = cut_at_pool(loaded.model)
    old = add_preprocessing(cut, recipe(loaded.recipe))  # as exported before weights were folded
    assert has_unfolded_int_weights(old)
    write_bundle(tmp_path / "old", old, name="old", source_kind="tflite", source_path=None, pretrained=True,
                 preprocessing=recipe(loaded.recipe), precision="fp32")  # fmt: skip
    with Embedder(tmp_path / "old", mode="throughput") as embedder:
        assert embedder.streams == 1
    import openvino as ov

    for bundle in mobilenet_bundles.values():
        assert not has_unfolded_int_weights(ov.Core().read_model(str(bundle / "model.xml")))
