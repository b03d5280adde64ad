"""Held-item detection: foreground against a learned background, and a state machine over it.

idle -> present -> steady -> result_shown -> cooldown -> idle. One ``item_id`` per hold: the pipeline
produces exactly one answer per id. Analysis runs on a small grey copy of the frame (``work_width``),
so a frame costs well under a millisecond; only the crop of a steady item goes to the embedder.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from device.camera.port import Image
from device.config import DetectionConfig

_LOGGER = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x, y, w, h in full-frame pixels
_THUMB: Final = 12  # appearance thumbnail side (colour): enough to see a swap, blind to sensor noise
_ANY_CHANNEL: Final = np.ones((1, 3), np.float32)  # cv2.transform: a 3-channel image -> its channels' sum
_OPEN_KERNEL: Final = np.ones((3, 3), np.uint8)


class DetectState(StrEnum):
    IDLE = "idle"
    PRESENT = "present"
    STEADY = "steady"
    RESULT_SHOWN = "result_shown"
    COOLDOWN = "cooldown"


ALLOWED: Final[dict[DetectState, frozenset[DetectState]]] = {
    DetectState.IDLE: frozenset({DetectState.PRESENT}),
    DetectState.PRESENT: frozenset({DetectState.STEADY, DetectState.IDLE, DetectState.RESULT_SHOWN}),
    DetectState.STEADY: frozenset({DetectState.PRESENT, DetectState.RESULT_SHOWN, DetectState.COOLDOWN}),
    DetectState.RESULT_SHOWN: frozenset({DetectState.COOLDOWN, DetectState.PRESENT}),
    DetectState.COOLDOWN: frozenset({DetectState.IDLE}),
}


class InvalidTransition(RuntimeError):
    """A detector state change outside ALLOWED (a bug)."""


@dataclass(frozen=True, slots=True)
class Detection:
    """What one frame showed. ``crop`` is set only while steady; ``closed`` names a hold that just ended."""

    state: DetectState
    item_id: int
    box: Box | None = None
    crop: Image | None = None
    closed: int | None = None


class DetectorPort(Protocol):
    """What the pipeline needs from a detector."""

    def update(self, image: Image) -> Detection:
        """Analyse one frame."""
        ...

    def mark_result_shown(self, item_id: int) -> None:
        """The answer for ``item_id`` is on screen (thread-safe; applied on the next update)."""
        ...


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _mean_abs_diff(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """Mean absolute difference of two appearance thumbnails (one OpenCV call)."""
    return float(cv2.norm(a, b, cv2.NORM_L1)) / a.size


def crop_with_margin(image: Image, box: Box, margin_frac: float) -> Image:
    """The box grown by ``margin_frac`` of its size on each side, clipped to the frame (a view)."""
    x, y, w, h = box
    mx, my = int(w * margin_frac), int(h * margin_frac)
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(image.shape[1], x + w + mx), min(image.shape[0], y + h + my)
    return image[y0:y1, x0:x1]


class HeldItemDetector:
    """Foreground (running-average background, lighting-compensated) + the held-item state machine."""

    def __init__(self, cfg: DetectionConfig) -> None:
        self._cfg = cfg
        self._bg: npt.NDArray[np.float32] | None = None
        self._scale = 1.0
        self.state = DetectState.IDLE
        self.item_id = 0
        self._present_run = 0
        self._absent_run = 0
        self._stable_run = 0
        self._change_run = 0
        self._cooldown_left = 0
        self._shown_frames = 0
        self._prev_box: Box | None = None
        self._prev_thumb: npt.NDArray[np.float32] | None = None
        self._shown_thumb: npt.NDArray[np.float32] | None = None
        self._shown_request: int | None = None
        self._lock = threading.Lock()

    def mark_result_shown(self, item_id: int) -> None:
        with self._lock:
            self._shown_request = item_id

    def _go(self, new: DetectState) -> None:
        if new not in ALLOWED[self.state]:
            raise InvalidTransition(f"detector {self.state} -> {new}")
        _LOGGER.debug("item %d: %s -> %s", self.item_id, self.state.value, new.value)
        self.state = new

    def _small(self, image: Image) -> Image:
        """The frame at analysis size, blurred: colour, because a green pack on a grey wall is grey too."""
        h, w = image.shape[:2]
        self._scale = w / self._cfg.work_width
        size = (self._cfg.work_width, max(1, round(h / self._scale)))
        # A LINEAR step reads 2x2 pixels per output pixel, and at an odd whole factor (800 -> 160) just one:
        # at 1280x720 one item's steadiness came 11 frames late, at 1920x1080 one hold never became steady
        # (tests/device/test_detect.py). A frame wider than 4x the analysis size comes down to twice it
        # first, then halves, so each analysis pixel averages 4x4 samples spread over its area; a 640-px
        # frame still takes one step (2x2 samples of its 4x4 pixels).
        if w > 4 * self._cfg.work_width:
            image = cv2.resize(image, (2 * size[0], 2 * size[1]), interpolation=cv2.INTER_LINEAR)
        # INTER_LINEAR, not AREA: the 5x5 blur that follows does the rest of the averaging, and AREA costs
        # ~0.44 ms of the 0.3 ms the whole detector may spend per frame (bench/pipeline.py "detector").
        # Not NEAREST either (~30 us cheaper): its aliased samples make a textured item's thumbnail flicker
        # between frames, and at 15 fps two of six holds were seen steady 1.3-1.8 s late
        # (tests/device/test_detect.py; the capacity bench's cameras).
        out: Image = cv2.GaussianBlur(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), (5, 5), 0)
        return out

    def _roi_box(self, image: Image) -> Box | None:
        if self._cfg.roi is None:
            return None
        h, w = image.shape[:2]
        x, y, rw, rh = self._cfg.roi
        return int(x * w), int(y * h), max(1, int(rw * w)), max(1, int(rh * h))

    def _foreground(self, small: Image, image: Image) -> Box | None:
        """The item's box in full-frame pixels, or None when nothing stands out from the background."""
        assert self._bg is not None
        # OpenCV's own ops, not numpy's temporaries (~0.25 -> ~0.14 ms on a loaded machine): the detector's
        # whole budget is 0.3 ms per frame (bench/pipeline.py "detector").
        diff = cv2.subtract(small, self._bg, dtype=cv2.CV_32F)
        # The median of every 8th pixel both ways (300 at 160x120; np.median's overhead alone is ~0.1 ms):
        # lighting drift moves every pixel alike.
        sample = np.sort(diff[::8, ::8].reshape(-1, 3), axis=0)
        m = sample[sample.shape[0] // 2]
        scalar = (float(m[0]), float(m[1]), float(m[2]), 0.0)  # a cv::Scalar: OpenCV's stubs omit it
        # Foreground: ANY channel beyond the threshold (a green pack on a grey wall is grey too). Threshold
        # all three at once and sum them (one 3 -> 1 channel matrix product), not split + max + compare:
        # ~22 us against ~60 us of the 0.3 ms budget.
        over = cv2.threshold(cv2.absdiff(diff, scalar), self._cfg.fg_threshold, 1.0,  # type: ignore[call-overload]
                             cv2.THRESH_BINARY)[1]  # fmt: skip
        raw = (cv2.transform(over, _ANY_CHANNEL) > 0).view(np.uint8)
        mask: Image = cv2.morphologyEx(raw, cv2.MORPH_OPEN, _OPEN_KERNEL)
        total = mask.shape[0] * mask.shape[1]
        if self._cfg.mode == "roi":
            roi = self._roi_box(image)
            assert roi is not None
            s = self._scale
            x, y, w, h = (int(v / s) for v in roi)
            frac = float(mask[y : y + h, x : x + w].mean()) if w and h else 0.0
            return roi if frac >= self._cfg.min_area_frac else None
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        areas = [cv2.contourArea(c) for c in contours]
        if not areas or max(areas) < self._cfg.min_area_frac * total:
            return None
        keep = [c for c, a in zip(contours, areas, strict=True) if a >= 0.1 * max(areas)]
        x, y, w, h = cv2.boundingRect(np.concatenate(keep))
        if w * h > self._cfg.max_area_frac * total:
            return self._roi_box(image)  # a global change: fall back to the fixed ROI (None without one)
        s = self._scale
        return int(x * s), int(y * s), max(1, int(w * s)), max(1, int(h * s))

    def _thumb(self, small: Image, box: Box) -> npt.NDArray[np.float32]:
        s = self._scale
        x, y, w, h = (int(v / s) for v in box)
        patch = small[y : y + max(1, h), x : x + max(1, w)]
        t = cv2.resize(patch, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
        # Brightness-independent: less its mean colour (cv2.mean is a cv::Scalar, which the stubs omit).
        centred: npt.NDArray[np.float32] = cv2.subtract(t, cv2.mean(t))  # type: ignore[call-overload]
        return centred

    def update(self, image: Image) -> Detection:
        """Advance the state machine by one frame."""
        cfg = self._cfg
        small = self._small(image)
        if self._bg is None or self._bg.shape != small.shape:
            self._bg = small.astype(np.float32)
            return Detection(self.state, self.item_id)
        with self._lock:
            shown, self._shown_request = self._shown_request, None
        box = self._foreground(small, image)
        thumb = self._thumb(small, box) if box is not None else None
        stable = (
            box is not None and self._prev_box is not None and thumb is not None
            and self._prev_thumb is not None
            and iou(box, self._prev_box) >= cfg.steady_iou
            and _mean_abs_diff(thumb, self._prev_thumb) <= cfg.steady_diff
        )
        self._prev_box, self._prev_thumb = box, thumb
        self._present_run = self._present_run + 1 if box is not None else 0
        self._absent_run = self._absent_run + 1 if box is None else 0
        closed: int | None = None
        st = self.state

        if st is DetectState.IDLE:
            if box is None:
                cv2.accumulateWeighted(small, self._bg, cfg.learn_rate)
            elif self._present_run >= cfg.present_frames:
                self.item_id += 1
                self._stable_run = 0
                self._go(DetectState.PRESENT)
        elif st in (DetectState.PRESENT, DetectState.STEADY):
            if shown == self.item_id:
                self._enter_shown(thumb)
            elif self._absent_run >= cfg.leave_frames:
                closed = self.item_id
                if st is DetectState.STEADY:
                    self._cooldown_left = cfg.cooldown_frames
                    self._go(DetectState.COOLDOWN)
                else:
                    self._go(DetectState.IDLE)
            elif box is not None:
                self._stable_run = self._stable_run + 1 if stable else 0
                if st is DetectState.PRESENT and self._stable_run >= cfg.steady_frames:
                    self._go(DetectState.STEADY)
                elif st is DetectState.STEADY and not stable:
                    self._go(DetectState.PRESENT)
        elif st is DetectState.RESULT_SHOWN:
            self._shown_frames += 1
            if self._absent_run >= cfg.leave_frames:
                self._cooldown_left = cfg.cooldown_frames
                self._go(DetectState.COOLDOWN)
            elif self._shown_frames >= cfg.absorb_frames:
                _LOGGER.info("item %d shown for %d frames: learning it as background", self.item_id,
                             self._shown_frames)
                self._bg = small.astype(np.float32)
                self._cooldown_left = cfg.cooldown_frames
                self._go(DetectState.COOLDOWN)
            elif thumb is not None and self._shown_thumb is not None:
                changed = stable and _mean_abs_diff(thumb, self._shown_thumb) > cfg.change_diff
                self._change_run = self._change_run + 1 if changed else 0
                if self._change_run >= cfg.present_frames:  # another item, held without leaving
                    self.item_id += 1
                    self._stable_run = 0
                    self._go(DetectState.PRESENT)
        elif st is DetectState.COOLDOWN:
            self._cooldown_left -= 1
            if self._cooldown_left <= 0:
                self._go(DetectState.IDLE)

        crop = None
        if self.state is DetectState.STEADY and box is not None:
            crop = crop_with_margin(image, box, cfg.margin_frac)
        return Detection(self.state, self.item_id, box, crop, closed)

    def _enter_shown(self, thumb: npt.NDArray[np.float32] | None) -> None:
        self._shown_thumb = thumb
        self._shown_frames = 0
        self._change_run = 0
        self._go(DetectState.RESULT_SHOWN)


class ForcedSteadyDetector:
    """Every frame is a new steady item covering the ROI (or the whole frame): benchmarks embed+search."""

    def __init__(self, roi: tuple[float, float, float, float] | None = None) -> None:
        self._roi = roi
        self.item_id = 0

    def mark_result_shown(self, item_id: int) -> None:
        """Nothing to do: each frame is its own item."""

    def update(self, image: Image) -> Detection:
        self.item_id += 1
        h, w = image.shape[:2]
        if self._roi is None:
            box: Box = (0, 0, w, h)
        else:
            x, y, rw, rh = self._roi
            box = (int(x * w), int(y * h), max(1, int(rw * w)), max(1, int(rh * h)))
        return Detection(DetectState.STEADY, self.item_id, box, crop_with_margin(image, box, 0.0))
