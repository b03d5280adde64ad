"""The frame pipeline over a generated clip with FakeEmbedder and a real (tiny) index."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.camera import BoundedQueue, Frame, GrabStage, OverflowPolicy
from device.camera.buffer import END
from device.camera.sources import SyntheticSource
from device.camera.synthetic import Scene, make_scene, render_items
from device.comms.stats import LatencyStats
from device.config import DetectionConfig
from device.detect import Detection, ForcedSteadyDetector, HeldItemDetector
from device.detect.detector import DetectState
from device.pipeline import Counters, ItemResult, ModelPair, Pipeline, aggregate, submit
from device.pipeline.stages import Close, DetectStage, Handoff, SearchStage
from device.sync.active import ActiveSnapshot
from models.fake import FakeEmbedder
from storelens.snapshot import verify_snapshot
from tests.device.snapshots import make_snapshot

N_ITEMS = 5


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], FakeEmbedder, ActiveSnapshot,
                                                               ActiveSnapshot]:
    items = render_items(N_ITEMS, seed=1)
    emb = FakeEmbedder(64)
    key = Ed25519PrivateKey.generate()
    skus = [f"sku{i}" for i in range(N_ITEMS)]
    snaps = []
    for version in (1, 2):
        d = make_snapshot(tmp_path_factory.mktemp(f"snap{version}"), emb.embed(items), skus, key,
                          model_id=emb.model_id, version=version, threshold=0.3, thumbs=items)
        snaps.append(ActiveSnapshot.load(d, verify_snapshot(d, [key.public_key()])))
    return items, emb, snaps[0], snaps[1]


@pytest.fixture(params=[False, True], ids=["overlap", "inline"])
def inline(request: pytest.FixtureRequest) -> bool:
    """Both designs: detect, embed and search on one thread (inline) or overlapped on three."""
    return bool(request.param)


def _run(scene: Scene, emb: FakeEmbedder, snapshot: Callable[[], ActiveSnapshot | None],
         on_result: Callable[[ItemResult], None], **kw: object) -> Pipeline:
    q: BoundedQueue[Frame] = BoundedQueue(4, OverflowPolicy.WAIT)
    grab = GrabStage(lambda: SyntheticSource(scene.frames), q)
    pipe = Pipeline(q, HeldItemDetector(DetectionConfig()), emb, snapshot, on_result=on_result,
                    **kw)  # type: ignore[arg-type]
    stop = threading.Event()
    t = threading.Thread(target=grab.run, args=(stop,), name="test-grab")
    t.start()
    pipe.start()
    try:
        assert pipe.wait(60.0), "pipeline did not reach the end of the clip"
    finally:
        stop.set()
        t.join(5.0)
        pipe.stop()
    return pipe


def test_one_result_per_held_item_with_the_right_sku(catalog: tuple, inline: bool) -> None:  # type: ignore[type-arg]
    """Every held item must produce exactly one answer, in order, naming the item held."""
    items, emb, snap, _ = catalog
    scene = make_scene(items, order=[2, 0, 4, 1, 3], seed=5)
    results: list[ItemResult] = []
    pipe = _run(scene, emb, lambda: snap, results.append, inline=inline)
    assert [r.hits[0].sku for r in results] == [f"sku{h.item}" for h in scene.schedule]
    assert all(r.matched and r.frames == 3 and r.snapshot_version == 1 for r in results)
    assert all(set(r.latency_ms) == {"capture", "detect", "embed", "search", "total"} for r in results)
    assert pipe.counters.frames_processed == scene.n_frames  # file semantics: every frame processed
    assert pipe.counters.results == N_ITEMS
    assert set(pipe.stats.percentiles()) == {"capture", "detect", "embed", "search", "total"}


def test_no_snapshot_means_no_answer_but_the_pipeline_keeps_going(catalog: tuple, inline: bool) -> None:  # type: ignore[type-arg]
    items, emb, _, _ = catalog
    scene = make_scene(items[:2])
    results: list[ItemResult] = []
    pipe = _run(scene, emb, lambda: None, results.append, inline=inline)
    assert results == []
    assert pipe.counters.no_snapshot == 2
    assert pipe.counters.frames_processed == scene.n_frames


def test_snapshot_swapped_between_items_without_losing_frames(catalog: tuple, inline: bool) -> None:  # type: ignore[type-arg]
    """A swap is one reference assignment: later items use the new snapshot, no frame is skipped."""
    items, emb, snap1, snap2 = catalog
    scene = make_scene(items, seed=2)
    active = [snap1]
    results: list[ItemResult] = []

    def on_result(r: ItemResult) -> None:
        results.append(r)
        if len(results) == 2:
            active[0] = snap2

    pipe = _run(scene, emb, lambda: active[0], on_result, inline=inline)
    assert [r.snapshot_version for r in results] == [1, 1, 2, 2, 2]
    assert [r.hits[0].sku for r in results] == [f"sku{i}" for i in range(N_ITEMS)]
    assert pipe.counters.frames_processed == scene.n_frames


def test_unknown_item_is_not_matched(catalog: tuple, tmp_path: Path, inline: bool) -> None:  # type: ignore[type-arg]
    """Below the snapshot's threshold the answer is "not found", not the nearest wrong product."""
    items, emb, snap, _ = catalog
    stranger = np.full_like(items[0], 255)
    stranger[::8] = 0
    results: list[ItemResult] = []
    _run(make_scene([stranger]), emb, lambda: snap, results.append, inline=inline)
    assert len(results) == 1
    assert not results[0].matched


def test_aggregate_votes_and_renormalises(catalog: tuple) -> None:  # type: ignore[type-arg]
    items, emb, snap, _ = catalog
    vecs = list(emb.embed([items[3], items[3], items[1]]))
    hits, agreement = aggregate(vecs, snap, 3)
    assert hits[0].sku == "sku3"
    assert agreement == pytest.approx(2 / 3)
    assert hits == sorted(hits, key=lambda h: -h.score)


def test_forced_steady_embeds_every_frame(catalog: tuple, inline: bool) -> None:  # type: ignore[type-arg]
    """The benchmark path: every frame embedded and searched, one result each."""
    items, emb, snap, _ = catalog
    frames = [np.ascontiguousarray(np.tile(items[i % N_ITEMS][:120, :120], (2, 2, 1))) for i in range(40)]
    q: BoundedQueue[Frame] = BoundedQueue(4, OverflowPolicy.WAIT)
    results: list[ItemResult] = []
    pipe = Pipeline(q, ForcedSteadyDetector(), emb, lambda: snap, on_result=results.append,
                    aggregate_frames=1, inline=inline)
    pipe.start()
    for i, f in enumerate(frames):
        q.put(Frame(i, 0.0, f))
    q.close()
    assert pipe.wait(30.0)
    pipe.stop()
    assert len(results) == 40


def test_embedders_of_open_items_are_reported_until_the_items_close() -> None:
    """An update may retire the model an item opened with; the kiosk must see that the item still uses it
    (else it closes the model and the item's next crops fail)."""
    frames: BoundedQueue[Frame] = BoundedQueue(4, OverflowPolicy.WAIT)
    emb = FakeEmbedder(16)
    seen = threading.Event()
    pipe = Pipeline(frames, ForcedSteadyDetector(), emb, lambda: None, on_result=lambda r: None,
                    on_frame=lambda f, d: seen.set(), aggregate_frames=3)
    pipe.start()
    try:
        frames.put(Frame(0, 0.0, np.zeros((48, 64, 3), np.uint8)), threading.Event())
        assert seen.wait(5.0)
        in_use = pipe.embedders_in_use()  # item 1 has one of its three crops: still open
        assert len(in_use) == 1 and getattr(in_use[0], "_inner", in_use[0]) is emb
        frames.close()  # END: every open item is closed
        assert pipe.wait(5.0)
        assert pipe.embedders_in_use() == []
    finally:
        pipe.stop()


class _ScriptedDetector:
    """One item (id 1) steady on every frame; the detector ends it at frame ``end_at`` if given."""

    def __init__(self, crop: np.ndarray, end_at: int | None = None) -> None:
        self._crop, self._end_at, self._n = crop, end_at, 0

    def update(self, image: np.ndarray) -> Detection:
        self._n += 1
        if self._end_at is not None and self._n >= self._end_at:
            return Detection(DetectState.IDLE, 1, closed=1 if self._n == self._end_at else None)
        return Detection(DetectState.STEADY, 1, (0, 0, 8, 8), self._crop)

    def mark_result_shown(self, item_id: int) -> None:
        pass


def _detect_only(detector: _ScriptedDetector, emb: object, n_frames: int, *, aggregate_frames: int = 3,
                 mirror_frame: bool = False) -> tuple[list[object], Counters]:
    """Run the detect stage alone over ``n_frames``; what it handed to the search stage, in order."""
    frames: BoundedQueue[Frame] = BoundedQueue(n_frames + 1, OverflowPolicy.WAIT)
    handoff: BoundedQueue[Handoff] = BoundedQueue(64, OverflowPolicy.WAIT)
    counters = Counters()
    # No search stage releases the crops' slots: room for them beside the 8 that END takes back.
    stage = DetectStage(frames, detector, lambda: ModelPair(emb, None), handoff,
                        threading.Semaphore(8 + n_frames), max_inflight=8, aggregate_frames=aggregate_frames,
                        mirror_frame=mirror_frame, counters=counters)  # fmt: skip
    for i in range(n_frames):
        frames.put(Frame(i, 0.0, np.zeros((8, 8, 3), np.uint8)))
    frames.close()
    stage.run(threading.Event())
    out = []
    while (msg := handoff.get(0)) not in (None, END):
        out.append(msg)
    return out, counters


def _search_only(emb: FakeEmbedder, snap: ActiveSnapshot, results: list[ItemResult]) -> SearchStage:
    """A search stage fed by hand (``_handle``): its results go to ``results``."""
    return SearchStage(BoundedQueue(1, OverflowPolicy.WAIT), threading.Semaphore(8),
                       lambda: ModelPair(emb, snap), top_k=3, counters=Counters(),
                       stats=LatencyStats(), on_result=results.append, on_shown=lambda i: None)  # fmt: skip


def test_an_items_last_crop_carries_its_count_and_no_close_follows(catalog: tuple) -> None:  # type: ignore[type-arg]
    """A held item's third crop tells the search stage it was the last: three hand-offs, not four."""
    items, emb, snap, _ = catalog
    msgs, _ = _detect_only(_ScriptedDetector(items[2]), emb, n_frames=6)
    assert [type(m).__name__ for m in msgs] == ["Embedded"] * 3
    assert [m.pending.final for m in msgs] == [0, 0, 3]  # type: ignore[attr-defined]
    results: list[ItemResult] = []
    search = _search_only(emb, snap, results)
    for m in reversed(msgs):  # out of order too: the last crop first
        search._handle(m)  # type: ignore[arg-type]
    assert len(results) == 1 and results[0].frames == 3 and results[0].hits[0].sku == "sku2"


class _Recorder:
    """An embedder that keeps every crop it is given (then embeds it with FakeEmbedder)."""

    def __init__(self, emb: FakeEmbedder) -> None:
        self._inner, self.crops = emb, []  # type: list[np.ndarray]
        self.dim, self.model_id = emb.dim, emb.model_id

    def submit(self, crop: np.ndarray, callback: Callable[..., None], userdata: object = None) -> None:
        self.crops.append(crop.copy())
        submit(self._inner, crop, callback, userdata)


@pytest.mark.parametrize(("aggregate", "mirror", "mirrored"),
                         [(3, True, [False, True, False]), (2, True, [False, True]), (1, True, [False]),
                          (3, False, [False, False, False])])  # fmt: skip
def test_the_second_crop_of_an_item_is_embedded_mirrored_and_feedback_keeps_the_real_one(
    catalog: tuple, aggregate: int, mirror: bool, mirrored: list[bool]  # type: ignore[type-arg]
) -> None:
    """Guards: the free mirrored view lost (the eval's multi-frame figures assume one), applied to other
    crops, or a mirrored crop sent to the cloud as a store photo."""
    items, emb, snap, _ = catalog
    crop = np.ascontiguousarray(items[3][:, :-7])  # not symmetric: mirrored != itself
    rec = _Recorder(emb)
    msgs, _ = _detect_only(_ScriptedDetector(crop), rec, n_frames=6, aggregate_frames=aggregate,
                           mirror_frame=mirror)  # fmt: skip
    assert len(rec.crops) == aggregate
    assert [bool(np.array_equal(c, crop[:, ::-1])) for c in rec.crops] == mirrored
    assert all(np.array_equal(c, crop) for c, m in zip(rec.crops, mirrored, strict=True) if not m)
    results: list[ItemResult] = []
    search = _search_only(emb, snap, results)
    for m in msgs:
        search._handle(m)  # type: ignore[arg-type]
    assert len(results) == 1 and results[0].crop is not None and np.array_equal(results[0].crop, crop)
    assert results[0].hits[0].sku == "sku3"


def test_an_item_the_detector_ends_early_is_answered_from_the_crops_it_had(catalog: tuple) -> None:  # type: ignore[type-arg]
    items, emb, snap, _ = catalog
    msgs, _ = _detect_only(_ScriptedDetector(items[4], end_at=3), emb, n_frames=5)  # 2 crops, then closed
    assert [type(m).__name__ for m in msgs] == ["Embedded", "Embedded", "Close"]
    assert msgs[-1] == Close(1, 2)
    results: list[ItemResult] = []
    search = _search_only(emb, snap, results)
    for m in msgs:
        search._handle(m)  # type: ignore[arg-type]
    assert len(results) == 1 and results[0].frames == 2 and results[0].hits[0].sku == "sku4"


class _FailsOnce:
    """An async embedder whose ``fail_at``-th submit raises (e.g. a request lost mid-update)."""

    def __init__(self, emb: FakeEmbedder, fail_at: int) -> None:
        self._inner, self._fail_at, self.calls = emb, fail_at, 0
        self.dim, self.model_id = emb.dim, emb.model_id

    def submit(self, crop: np.ndarray, callback: Callable[..., None], userdata: object = None) -> None:
        self.calls += 1
        if self.calls == self._fail_at:
            raise RuntimeError("submit failed")
        submit(self._inner, crop, callback, userdata)


def test_a_failed_last_crop_is_retried_on_the_next_steady_frame(catalog: tuple) -> None:  # type: ignore[type-arg]
    items, emb, _, _ = catalog
    flaky = _FailsOnce(emb, fail_at=3)
    msgs, counters = _detect_only(_ScriptedDetector(items[1]), flaky, n_frames=6)
    assert [type(m).__name__ for m in msgs] == ["Embedded"] * 3  # the item was not closed by the failure
    assert [m.pending.final for m in msgs] == [0, 0, 3]  # type: ignore[attr-defined]
    assert [m.pending.frame_seq for m in msgs] == [0, 1, 3]  # type: ignore[attr-defined]
    assert counters.embed_errors == 1 and flaky.calls == 4
