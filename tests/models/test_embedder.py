"""Embedder runtime: in-graph preprocessing equals the numpy/cv2 reference, bad crops, async == sync."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.bundle import read_manifest
from models.embedder import Embedder
from models.errors import BadImage, ModelError
from models.export import load_source
from models.fake import FakeEmbedder
from models.graph import cut_at_pool
from models.port import EmbedderPort


def _crops(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (1, 1), (480, 640), (33, 500), (300, 200)]
    return [
        cv2.GaussianBlur(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8), (5, 5), 0)
        for i in range(n)
    ]


def test_in_graph_preprocessing_matches_reference(tiny_bundle: Path) -> None:
    """u8 resize -> RGB -> mean/std in the graph must equal cv2.resize + numpy feeding the bare backbone."""
    import openvino as ov

    prep = read_manifest(tiny_bundle).preprocessing
    backbone, _ = cut_at_pool(load_source("tiny").model)
    bare = ov.Core().compile_model(backbone, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    h, w = prep["size"]
    # The bundle's own graph (dynamic input: any crop size), as any OpenVINO client would run it.
    graph = ov.Core().compile_model(
        str(tiny_bundle / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    for crop in _crops(5):
        x = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB).astype(np.float32)
        x = (x - np.array(prep["mean"], np.float32)) / np.array(prep["scale"], np.float32)
        want = bare(x.transpose(2, 0, 1)[None])[0][0]
        want = want / np.linalg.norm(want)
        got = graph(crop[None])[0][0]
        # In-graph resize rounds to u8 (off by at most 1 level from cv2), hence not exact.
        assert float(got @ want) > 0.999, crop.shape


def test_in_graph_centre_crop_matches_reference() -> None:
    """A recipe's centre crop must keep the middle share of ANY input size before the resize, exactly as
    a numpy slice + cv2.resize reference; and the Embedder (host Resize(size/crop), graph crop) agrees."""
    import openvino as ov

    from models.export import recipe
    from models.graph import add_preprocessing

    prep = {**recipe("tiny"), "crop": 0.75}
    backbone, _ = cut_at_pool(load_source("tiny").model)
    bare = ov.Core().compile_model(backbone, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    graph = ov.Core().compile_model(
        add_preprocessing(backbone, prep), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    h, w = prep["size"]

    def reference(img: np.ndarray) -> np.ndarray:
        x = cv2.cvtColor(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        x = (x.astype(np.float32) - np.array(prep["mean"], np.float32)) / np.array(prep["scale"], np.float32)
        v = bare(x.transpose(2, 0, 1)[None])[0][0]
        return np.asarray(v / np.linalg.norm(v))

    for crop in _crops(5, seed=3):
        crop[: crop.shape[0] // 8] = 255  # a white band that the crop must remove
        ch, cw = max(1, round(crop.shape[0] * 0.75)), max(1, round(crop.shape[1] * 0.75))
        y, x = (crop.shape[0] - ch) // 2, (crop.shape[1] - cw) // 2
        got = graph(crop[None])[0][0]
        assert float(got @ reference(crop[y : y + ch, x : x + cw])) > 0.999, crop.shape
        if min(crop.shape[:2]) >= 32:  # the uncropped image (band included) is measurably another input
            assert float(got @ reference(crop)) < 0.999, crop.shape


def test_embedder_is_host_fit_then_graph(tiny_bundle: Path) -> None:
    """The Embedder pre-sizes crops on the host (static shapes: no concurrent specialisation) then runs
    the graph; its vectors must equal feeding fit_to_input's output to the bundle graph directly."""
    import openvino as ov

    from models.embedder import fit_to_input

    graph = ov.Core().compile_model(
        str(tiny_bundle / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    with Embedder(tiny_bundle) as embedder:
        h, w = embedder.input_hw
        for crop in _crops(5):
            want = graph(fit_to_input(crop, h, w)[None])[0][0]
            assert float(embedder.embed_one(crop) @ want) > 0.9999, crop.shape


def test_unit_norm_and_order(tiny_bundle: Path) -> None:
    """embed must return (n, dim) float32 unit rows in input order, for any crop size."""
    crops = _crops(10)
    with Embedder(tiny_bundle, mode="throughput") as embedder:
        out = embedder.embed(crops)
        assert out.shape == (10, 64) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        reversed_out = embedder.embed(crops[::-1])[::-1]
        np.testing.assert_allclose(out, reversed_out, atol=1e-6)
        assert embedder.embed([]).shape == (0, 64)


def test_async_equals_sync(tiny_bundle: Path) -> None:
    """submit()'s callbacks and embed() must give embed_one()'s vectors, each to its own userdata."""
    crops = _crops(12)
    got: dict[object, np.ndarray] = {}
    lock = threading.Lock()
    done = threading.Event()

    def on_vector(vec: np.ndarray, key: object) -> None:
        with lock:
            got[key] = vec
            if len(got) == len(crops):
                done.set()

    with Embedder(tiny_bundle, mode="throughput", num_requests=3) as embedder:
        sync = np.stack([embedder.embed_one(c) for c in crops])
        batched = embedder.embed(crops)
        for i, crop in enumerate(crops):
            embedder.submit(crop, on_vector, i)
            crop[:] = 0  # the caller may reuse its buffer at once
        assert embedder.wait(timeout=10)
        assert done.is_set()  # wait() returns after the callbacks, not merely after the inferences
    np.testing.assert_allclose(batched, sync, atol=1e-6)
    for i in range(len(crops)):
        np.testing.assert_allclose(got[i], sync[i], atol=1e-6)


def test_failed_inference_still_reaches_the_callback(tiny_bundle: Path) -> None:
    """A submitted crop whose inference fails must still call back (with None): the kiosk pipeline holds
    an in-flight slot per crop, and a silent loss would stall it after two failures."""
    got: list[object] = []
    with Embedder(tiny_bundle) as embedder:
        real = embedder._infer

        def flaky(arr: np.ndarray) -> np.ndarray:
            if int(arr[0, 0, 0]) == 7:
                raise RuntimeError("device lost")
            return real(arr)

        embedder._infer = flaky  # type: ignore[method-assign]
        for value in (1, 7, 2):
            embedder.submit(np.full((32, 32, 3), value, np.uint8), lambda v, k: got.append((k, v)), value)
        assert embedder.wait(timeout=10)
    assert [k for k, _ in got] == [1, 7, 2]
    assert [v is None for _, v in got] == [False, True, False]


@pytest.mark.parametrize(
    "crop",
    [
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((10, 0, 3), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        b"not an array",
    ],
    ids=["empty-h", "empty-w", "float", "gray", "bgra", "bytes"],
)
def test_bad_crops_raise_bad_image(tiny_bundle: Path, crop: object) -> None:
    """Empty, mistyped or misshapen crops must raise BadImage before reaching OpenVINO."""
    with Embedder(tiny_bundle) as embedder:
        with pytest.raises(BadImage):
            embedder.embed_one(crop)  # type: ignore[arg-type]
        with pytest.raises(BadImage):
            embedder.embed([np.zeros((5, 5, 3), np.uint8), crop])  # type: ignore[list-item]


def test_non_contiguous_crop_is_accepted(tiny_bundle: Path) -> None:
    """A strided view (a crop of a frame) must embed the same as its contiguous copy."""
    frame = _crops(1)[0]
    frame = np.ascontiguousarray(np.broadcast_to(frame[:1, :1], (100, 100, 3)))
    frame[10:60, 20:90] = 200
    view = frame[10:60:2, 20:90:3]
    with Embedder(tiny_bundle) as embedder:
        np.testing.assert_allclose(embedder.embed_one(view), embedder.embed_one(view.copy()), atol=1e-6)


def test_closed_embedder_refuses(tiny_bundle: Path) -> None:
    """Using an embedder after close must raise ModelError, not crash in OpenVINO."""
    embedder = Embedder(tiny_bundle, cache_dir=tiny_bundle.parent / "cache")
    embedder.close()
    embedder.close()
    with pytest.raises(ModelError):
        embedder.embed_one(np.zeros((4, 4, 3), np.uint8))


def test_a_share_of_the_machine_is_never_pinned(tiny_bundle: Path) -> None:
    """An Embedder given a thread count (a Ray actor's share) runs that many threads, unpinned.

    OpenVINO pins a latency-hint model's threads to cores it picks without regard to other processes:
    two 1-thread actors on a 2-core machine shared one core (half the catalog-build rate on Ray).
    """
    with Embedder(tiny_bundle, mode="latency", threads=1) as share:
        assert share._compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert share._compiled.get_property("ENABLE_CPU_PINNING") is False


def test_ports(tiny_bundle: Path) -> None:
    """Embedder and FakeEmbedder must both fit EmbedderPort; the fake is deterministic and unit-norm."""
    fake = FakeEmbedder(dim=32)
    assert isinstance(fake, EmbedderPort)
    crops = _crops(4)
    a, b = fake.embed(crops), FakeEmbedder(dim=32).embed(crops)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    with Embedder(tiny_bundle) as embedder:
        assert isinstance(embedder, EmbedderPort)


def test_openvino_sends_no_telemetry(tiny_bundle: Path) -> None:
    """`import openvino` starts Intel's usage telemetry (a sender thread, a subprocess per event) unless
    opted out: a kiosk must phone nobody. In a fresh process, an Embedder must leave no such thread."""

    code = (
        "import sys, threading, numpy as np\n"
        "from pathlib import Path\n"
        "from models.embedder import Embedder\n"
        f"e = Embedder(Path({str(tiny_bundle)!r}))\n"
        "e.embed_one(np.zeros((8, 8, 3), np.uint8)); e.close()\n"
        "print(sorted(t.name for t in threading.enumerate()), sys.modules.get('openvino_telemetry'))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}  # no CI=true: it would mute the telemetry
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, cwd=root, env=env)  # fmt: skip
    assert out.stdout.strip() == "['MainThread'] None", out.stdout + out.stderr


_CLOSE_THEN_SIGTERM = """
import os, signal, sys, threading
import numpy as np
from models.embedder import Embedder
got = threading.Event()
signal.signal(signal.SIGTERM, lambda signum, frame: got.set())
emb = Embedder(sys.argv[1], mode="latency")
emb.embed_one(np.zeros((32, 32, 3), np.uint8))
closer = threading.Thread(target=emb.close)
closer.start()
closer.join()
os.kill(os.getpid(), signal.SIGTERM)
sys.exit(0 if got.wait(10) else 3)
"""


def test_a_model_closed_off_its_thread_leaves_the_process_able_to_take_sigterm(tiny_bundle: Path) -> None:
    """A kiosk closes a replaced model on a helper thread. With a Core per Embedder, OpenVINO's CPU plugin
    unmapped the alternate signal stack it had given the compiling thread, and the next SIGTERM killed
    the process with SIGSEGV instead of running its stop path (exit -11)."""

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _CLOSE_THEN_SIGTERM, str(tiny_bundle)], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode(errors="replace")[-2000:])
