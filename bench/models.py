"""Model bench: our Embedder against OpenVINO's benchmark_app on the same IR, as ratios (ours / reference).

``run(out_dir)`` exports resnet50 fp16 and int8 (untrained: speed does not depend on weight values) and the
Coral MobileNetV2 (when ../shared is present), then measures throughput (THROUGHPUT hint, ``embed`` over
pre-decoded crops of the model's input size) and latency (LATENCY hint, ``embed_one`` p50/p99), and the
same with benchmark_app (``-infer_precision f32``, ``-shape [1,H,W,3]``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import cpu
from models.embedder import Embedder
from models.export import export_model

_LOGGER = logging.getLogger(__name__)

BENCH_S = 6  # per benchmark_app run: long enough for a stable median on 2 cores, keeps the bench < 4 min
OURS_THROUGHPUT_S = 6.0
ROUNDS = 2  # throughput rounds of ours, between ROUNDS + 1 of benchmark_app's
LATENCY_RUNS = 150
CALL_CROPS_REPEAT = 8  # the 32 distinct crops repeated: 256 per embed() call


def _shared() -> Path:
    return Path(os.environ.get("SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _benchmark_app(
    xml: Path, hint: str, size: tuple[int, int], *, nstreams: int | None = None, seconds: int = BENCH_S
) -> dict[str, Any]:
    """Run benchmark_app on the bundle's IR: its throughput (FPS), median latency (ms), and the CPU
    seconds and inferences of the run (bench/cpu.py)."""
    exe = Path(sys.executable).with_name("benchmark_app")
    shape = f"[1,{size[0]},{size[1]},3]"
    if nstreams is not None:  # benchmark_app refuses -nstreams unless the hint is "none"
        hint = "none"
    cmd = [str(exe), "-m", str(xml), "-d", "CPU", "-hint", hint, "-t", str(seconds),
           "-infer_precision", "f32", "-shape", shape]  # fmt: skip
    if nstreams is not None:
        cmd += ["-nstreams", str(nstreams), "-nireq", "2"]
    return run_benchmark_app(cmd, timeout_s=BENCH_S * 10)


def run_benchmark_app(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one benchmark_app command: its FPS, median latency (ms), iterations and CPU seconds."""
    proc, cpu_s = cpu.run_measured(cmd, timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark_app failed: {proc.stderr[-500:] or proc.stdout[-500:]}")
    fps = re.search(r"Throughput:\s+([\d.]+)\s+FPS", proc.stdout)
    median = re.search(r"Median:\s+([\d.]+)\s+ms", proc.stdout)
    if fps is None or median is None:
        raise RuntimeError(f"cannot parse benchmark_app output: {proc.stdout[-500:]}")
    count = re.search(r"Count:\s+(\d+)\s+iterations", proc.stdout)
    return {"fps": float(fps.group(1)), "median_ms": float(median.group(1)), "cpu_s": cpu_s,
            "count": int(count.group(1)) if count else None}  # fmt: skip


def _ours(bundle: Path, size: tuple[int, int], ref: Callable[[], float]) -> dict[str, Any]:
    """Our throughput interleaved with benchmark_app's (``ref()``), ROUNDS each, and our latency."""
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(32)]
    # Each embed() call ends when its slowest request does, idling the other stream for up to one
    # inference: 256 crops per call, like a catalog build's steady stream (32 per call measured 2-4% lower
    # on the ~270 img/s bundles; benchmark_app runs without such a barrier).
    stream = crops * CALL_CROPS_REPEAT
    ours_fps, ref_fps = [], [ref()]
    with Embedder(bundle, mode="throughput") as embedder:
        embedder.embed(crops[:8])  # warm-up
        for _ in range(ROUNDS):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < OURS_THROUGHPUT_S:
                embedder.embed(stream)
                n += len(stream)
            ours_fps.append(n / (time.perf_counter() - start))
            ref_fps.append(ref())
        requests, streams = embedder.num_requests, embedder.streams
    with Embedder(bundle, mode="latency") as embedder:
        for crop in crops[:10]:
            embedder.embed_one(crop)
        times_ms = []
        for i in range(LATENCY_RUNS):
            t0 = time.perf_counter()
            embedder.embed_one(crops[i % len(crops)])
            times_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "fps": float(np.median(ours_fps)),
        "ref_fps": float(np.median(ref_fps)),
        "fps_rounds": [round(f, 1) for f in ours_fps],
        "ref_fps_rounds": [round(f, 1) for f in ref_fps],
        "throughput_requests": requests,
        "throughput_streams": streams,
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p99_ms": float(np.percentile(times_ms, 99)),
    }


def _measure(bundle: Path) -> dict[str, Any]:
    from models.bundle import input_hw, read_manifest

    manifest = read_manifest(bundle)
    size = input_hw(manifest.preprocessing)  # what the Embedder feeds the graph (before its centre crop)
    # benchmark_app's own settings for each hint: THROUGHPUT (2 streams here, like the Embedder's
    # throughput mode) and LATENCY (one stream, one request, like the kiosk's). Throughput rounds are
    # interleaved (ref, ours, ref, ours, ref) and medians compared: one pair in sequence moved +-10%.
    ours = _ours(bundle, size, lambda: _benchmark_app(bundle / "model.xml", "throughput", size)["fps"])
    ref_lat = _benchmark_app(bundle / "model.xml", "latency", size)
    return {
        "model": manifest.name,
        "precision": manifest.precision,
        "crop": list(size),
        "ours_fps": round(ours["fps"], 1),
        "ours_p50_ms": round(ours["p50_ms"], 2),
        "ours_p99_ms": round(ours["p99_ms"], 2),
        "ours_throughput_requests": ours["throughput_requests"],
        "ours_throughput_streams": ours["throughput_streams"],
        "benchmark_app_fps": round(ours["ref_fps"], 1),
        "ours_fps_rounds": ours["fps_rounds"],
        "benchmark_app_fps_rounds": ours["ref_fps_rounds"],
        "benchmark_app_latency_median_ms": ref_lat["median_ms"],
        "throughput_ratio": round(ours["fps"] / ours["ref_fps"], 3),
        # ours / reference on latency: below 1 is faster than benchmark_app.
        "latency_ratio": round(ours["p50_ms"] / ref_lat["median_ms"], 3),
    }


def calibration_dir(out_dir: Path) -> Path:
    """int8 calibration photos: the grocery train photos when ../shared has them, else 32 generated."""
    grocery_train = _shared() / "data" / "grocery" / "train"
    if grocery_train.is_dir():
        return grocery_train
    calib = Path(out_dir) / "calibration"
    calib.mkdir(parents=True, exist_ok=True)
    import cv2

    rng = np.random.default_rng(0)
    for i in range(32):
        cv2.imwrite(str(calib / f"{i}.png"), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return calib


def export_bench_bundle(out_dir: Path, key: str, source: str, precision: str) -> Path:
    """``source`` exported afresh (this code's graph) to ``out_dir/key`` at ``precision``."""
    path = Path(out_dir) / key
    calib = calibration_dir(out_dir) if precision == "int8" else None
    # 64 calibration images: quantization speed is what is measured here, not its accuracy.
    export_model(source, path, precision=precision, calibration=calib, subset_size=64)
    return path


def run(out_dir: Path) -> dict[str, Any]:
    """Export the bench bundles under ``out_dir`` and measure them; a JSON-ready dict."""
    out_dir = Path(out_dir)
    # (key, source, precision); int8 is calibrated on calibration_dir().
    plan: list[tuple[str, str, str]] = [
        ("resnet50_fp16", "resnet50", "fp16"),
        ("resnet50_int8", "resnet50", "int8"),
    ]
    mobilenet = _shared() / "models" / "coral" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
    if mobilenet.is_file():
        plan.append(("mobilenet_v2_fp16", str(mobilenet), "fp16"))
    from bench import quick

    results: dict[str, Any] = {"cpu_count": os.cpu_count()}
    for key, source, precision in plan[-1:] if quick() else plan:  # quick: MobileNetV2 (or ResNet-50 int8)
        t0 = time.perf_counter()
        path = export_bench_bundle(out_dir, key, source, precision)
        export_s = time.perf_counter() - t0
        results[key] = _measure(path) | {"export_s": round(export_s, 1)}
        _LOGGER.info("bench %s: %s", key, results[key])
    return results
