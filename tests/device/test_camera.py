"""Camera port adapters, the bounded frame queue and the grab stage (stall, reopen, end of file)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.camera import END, BoundedQueue, CameraState, Frame, GrabStage, OverflowPolicy
from device.camera.grab import ALLOWED, InvalidTransition
from device.camera.port import CameraPort, Image
from device.camera.sources import (
    ImageFolderSource,
    OpenCVSource,
    SyntheticSource,
    open_source_factory,
    parse_source,
    redact,
    source_is_live,
)
from device.camera.synthetic import make_scene, render_items, store_photo, write_video


def _frames(n: int, value: int = 0) -> Iterator[Image]:
    for i in range(n):
        yield np.full((48, 64, 3), (value + i) % 256, np.uint8)


def _drain(q: BoundedQueue[Frame], timeout_s: float = 5.0) -> list[Frame]:
    out: list[Frame] = []
    while True:
        item = q.get(timeout_s)
        assert item is not None, "queue never delivered END"
        if item is END:
            return out
        assert isinstance(item, Frame)
        out.append(item)


def test_drop_oldest_keeps_newest_and_counts() -> None:
    """A live queue that silently grew, or lost frames uncounted, would hide lag and drops."""
    q: BoundedQueue[int] = BoundedQueue(2, OverflowPolicy.DROP_OLDEST)
    for i in range(5):
        assert q.put(i)
    assert q.dropped == 3
    assert [q.get(0), q.get(0)] == [3, 4]
    assert q.get(0) is None


def test_wait_policy_blocks_until_room_and_stop_releases_it() -> None:
    """A producer blocked on put() must never outlive the stop event."""
    q: BoundedQueue[int] = BoundedQueue(1, OverflowPolicy.WAIT)
    assert q.put(1)
    stop = threading.Event()
    done = threading.Event()
    result: list[bool] = []

    def producer() -> None:
        result.append(q.put(2, stop))
        done.set()

    t = threading.Thread(target=producer, name="test-producer")
    t.start()
    assert not done.wait(0.1)
    stop.set()
    assert done.wait(2.0)
    t.join(2.0)
    assert result == [False]
    assert q.dropped == 0


def test_end_sentinel_fits_a_full_queue() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, OverflowPolicy.WAIT)
    q.put(1)
    q.close()
    assert q.get(0) == 1
    assert q.get(0) is END


def test_parse_source_kinds(tmp_path: Path) -> None:
    assert parse_source("0").kind == "usb"
    assert parse_source("usb:2").target == "2"
    assert parse_source("rtsp://u:p@cam/1").kind == "url"
    assert parse_source("synthetic").kind == "synthetic"
    assert parse_source(str(tmp_path)).kind == "folder"
    assert parse_source(str(tmp_path / "clip.avi")).kind == "file"
    assert source_is_live("rtsp://cam/1") and not source_is_live(str(tmp_path))
    assert redact("rtsp://admin:secret@cam/1") == "rtsp://admin:***@cam/1"


def test_grab_file_source_delivers_every_frame_then_end() -> None:
    """Files use the wait policy: every frame reaches the pipeline, none dropped, then END."""
    q: BoundedQueue[Frame] = BoundedQueue(2, OverflowPolicy.WAIT)
    grab = GrabStage(lambda: SyntheticSource(lambda: _frames(50)), q)
    stop = threading.Event()
    t = threading.Thread(target=grab.run, args=(stop,), name="test-grab")
    t.start()
    frames = _drain(q)
    t.join(5.0)
    assert [f.seq for f in frames] == list(range(50))
    assert grab.frames_dropped == 0
    assert grab.state is CameraState.ENDED


class _StallingSource:
    """Delivers ``n`` frames, then answers read() with nothing (as cv2 does after its read timeout)."""

    opened = 0

    def __init__(self, n: int, gate: threading.Event) -> None:
        self._n = n
        self._gate = gate
        self._left = 0

    @property
    def live(self) -> bool:
        return True

    def open(self) -> bool:
        type(self).opened += 1
        self._left = self._n
        return True

    def read(self) -> tuple[bool, Image | None]:
        if self._left > 0:
            self._left -= 1
            return True, np.zeros((8, 8, 3), np.uint8)
        self._gate.wait(0.01)  # a read timeout, kept short
        return False, None

    def release(self) -> None:
        self._left = 0


def test_stalled_camera_is_reported_and_reopened() -> None:
    """A camera that stops delivering must be detected, released and reopened, and say so."""
    _StallingSource.opened = 0
    gate = threading.Event()
    q: BoundedQueue[Frame] = BoundedQueue(2, OverflowPolicy.DROP_OLDEST)
    transitions: list[tuple[CameraState, CameraState]] = []
    reopened = threading.Event()

    def on_state(old: CameraState, new: CameraState) -> None:
        transitions.append((old, new))
        if new is CameraState.STREAMING and _StallingSource.opened >= 3:
            reopened.set()

    grab = GrabStage(lambda: _StallingSource(5, gate), q, stall_s=0.05, backoff_min_s=0.0, backoff_max_s=0.0,
                     on_state=on_state)
    stop = threading.Event()
    t = threading.Thread(target=grab.run, args=(stop,), name="test-grab")
    t.start()
    assert reopened.wait(5.0)
    stop.set()
    t.join(5.0)
    assert not t.is_alive()
    assert (CameraState.STREAMING, CameraState.STALLED) in transitions
    assert (CameraState.STALLED, CameraState.OPENING) in transitions
    assert grab.reopens >= 2
    assert grab.frames_in >= 15
    assert grab.frames_dropped > 0  # live: only the freshest frames kept, and the rest counted
    assert grab.state is CameraState.STOPPED


def test_open_failure_backs_off_with_jitter_and_keeps_trying() -> None:
    class _Dead:
        live = True

        def open(self) -> bool:
            return False

        def read(self) -> tuple[bool, Image | None]:
            return False, None

        def release(self) -> None:
            pass

    tries = threading.Event()
    count = [0]

    def factory() -> CameraPort:
        count[0] += 1
        if count[0] >= 3:
            tries.set()
        return _Dead()

    q: BoundedQueue[Frame] = BoundedQueue(1, OverflowPolicy.DROP_OLDEST)
    grab = GrabStage(factory, q, backoff_min_s=0.001, backoff_max_s=0.004)
    assert all(0.001 <= grab.backoff_s(a) <= 0.004 for a in range(20))
    stop = threading.Event()
    t = threading.Thread(target=grab.run, args=(stop,), name="test-grab")
    t.start()
    assert tries.wait(5.0)
    assert grab.state in (CameraState.ERROR, CameraState.OPENING)
    stop.set()
    t.join(5.0)
    assert not t.is_alive()


def test_transition_table_refuses_invalid_moves() -> None:
    assert CameraState.STREAMING not in ALLOWED[CameraState.STOPPED]
    grab = GrabStage(lambda: SyntheticSource(lambda: _frames(1)), BoundedQueue(1, OverflowPolicy.WAIT))
    with pytest.raises(InvalidTransition):
        grab._set(CameraState.STREAMING)


def test_video_file_and_image_folder_sources(tmp_path: Path) -> None:
    """The OpenCV file adapter and the folder adapter read what was written; a bad image is skipped."""
    scene = make_scene(render_items(1), lead_s=0.2, hold_s=0.2, enter_s=0.1, leave_s=0.1, gap_s=0.1)
    video = write_video(scene, tmp_path / "clip.avi")
    src = OpenCVSource(str(video))
    assert not src.live and src.open()
    n = 0
    while src.read()[0]:
        n += 1
    src.release()
    assert n == scene.n_frames

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((10, 10, 3), i * 50, np.uint8))
    (folder / "3.jpg").write_bytes(b"not an image")
    fsrc = ImageFolderSource(folder)
    assert fsrc.open()
    got = []
    while True:
        ok, img = fsrc.read()
        if not ok:
            break
        assert img is not None
        got.append(int(img[0, 0, 0]))
    assert got == [0, 50, 100]
    assert fsrc.skipped == 1
    factory = open_source_factory(str(video), fps=1000.0)
    paced = factory()
    assert paced.open() and paced.read()[0]
    paced.release()


def test_store_photo_is_the_item_on_a_backdrop_not_a_copy() -> None:
    """The demo's second catalog view must differ from the pack shot like a store photo does: a mirror copy
    made the calibrated "no match" rule turn away every camera crop of the synthetic demo."""
    pack = render_items(4, seed=3)[2]
    photo = store_photo(pack, seed=5, size=320)
    assert photo.shape == (320, 320, 3) and photo.dtype == np.uint8
    assert np.array_equal(photo, store_photo(pack, seed=5, size=320))
    assert not np.array_equal(photo, store_photo(pack, seed=6, size=320))
    base = pack[pack.shape[0] // 10, pack.shape[1] // 10].astype(int)  # the pack's background colour
    near = np.abs(photo.astype(int) - base).max(axis=2) < 40
    assert 0.1 < near.mean() < 0.6, near.mean()  # the item covers part of the photo, the shelf the rest
    assert not near[0, 0] and not near[-1, -1]
