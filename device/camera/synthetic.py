"""Generated kiosk scenes: items held up one after another in front of a static, mildly noisy background.

Used by the demo, the end-to-end tests and the benchmarks; ``Scene.schedule`` is the ground truth
(which item is held at which frames).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from device.camera.port import Image

_NOISE_FIELDS = 8  # pre-drawn noise images cycled per frame: per-frame noise without per-frame RNG cost


@dataclass(frozen=True, slots=True)
class HeldItem:
    """Ground truth for one hold: frames [enter, steady) move in, [steady, leave) still, [leave, exit) out."""

    item: int
    enter_frame: int
    steady_frame: int
    leave_frame: int
    exit_frame: int


@dataclass(frozen=True)
class Scene:
    """A deterministic clip: ``frames()`` renders it lazily; ``schedule`` says what is held when."""

    items: tuple[Image, ...]
    schedule: tuple[HeldItem, ...]
    n_frames: int
    width: int = 640
    height: int = 480
    fps: float = 30.0
    noise_sigma: float = 2.0
    seed: int = 0
    _background: Image = field(init=False, repr=False, compare=False)
    _noise: tuple[tuple[Image, Image], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        object.__setattr__(self, "_background", _background(self.width, self.height, rng))
        fields = [rng.normal(0.0, self.noise_sigma, (self.height, self.width)) for _ in range(_NOISE_FIELDS)]
        noise = tuple(
            (
                cv2.merge([np.clip(f, 0, 255).astype(np.uint8)] * 3),
                cv2.merge([np.clip(-f, 0, 255).astype(np.uint8)] * 3),
            )
            for f in fields
        )
        object.__setattr__(self, "_noise", noise)

    def frames(self) -> Iterator[Image]:
        """Every frame in order."""
        for i in range(self.n_frames):
            yield self.frame(i)

    def frame(self, i: int) -> Image:
        """Frame ``i``: background, the item held at that time (if any), lighting drift and noise."""
        img = self._background.copy()
        for h in self.schedule:
            if h.enter_frame <= i < h.exit_frame:
                x, y = self._position(h, i)
                _paste(img, self.items[h.item], x, y)
                break
        gain = 1.0 + 0.02 * math.sin(2.0 * math.pi * i / (self.fps * 7.0))  # slow, mild lighting drift
        plus, minus = self._noise[i % _NOISE_FIELDS]
        out = cv2.convertScaleAbs(img, alpha=gain)
        return cv2.subtract(cv2.add(out, plus), minus)

    def _position(self, h: HeldItem, i: int) -> tuple[int, int]:
        """Centre of the item at frame ``i``: enters from below, rests near the centre, leaves to the side."""
        cx, cy = self.width // 2 + (h.item % 3 - 1) * 20, self.height // 2
        if i < h.steady_frame:
            t = (i - h.enter_frame + 1) / max(1, h.steady_frame - h.enter_frame)
            t = 1.0 - (1.0 - t) ** 2  # ease out
            return cx, round(self.height + 150 - (self.height + 150 - cy) * t)
        if i < h.leave_frame:
            jitter = ((i * 7919) % 3) - 1 if (i // 5) % 2 else 0  # a hand is never perfectly still
            return cx + jitter, cy
        t = (i - h.leave_frame + 1) / max(1, h.exit_frame - h.leave_frame)
        return round(cx + (self.width + 200 - cx) * t * t), cy

    def steady_frames(self) -> set[int]:
        """Frame numbers at which some item is held still."""
        return {i for h in self.schedule for i in range(h.steady_frame, h.leave_frame)}


def make_scene(
    items: Sequence[Image],
    *,
    order: Sequence[int] | None = None,
    width: int = 640,
    height: int = 480,
    fps: float = 30.0,
    lead_s: float = 1.0,
    enter_s: float = 0.4,
    hold_s: float = 1.3,
    leave_s: float = 0.4,
    gap_s: float = 0.8,
    item_px: int = 200,
    noise_sigma: float = 2.0,
    seed: int = 0,
) -> Scene:
    """Schedule each item (or ``order``) to be held once, with a background-only lead-in and gaps."""
    sized = tuple(_fit(img, item_px) for img in items)
    seq = list(order) if order is not None else list(range(len(sized)))

    def f(seconds: float) -> int:
        return max(1, round(seconds * fps))

    t = f(lead_s)
    schedule = []
    for idx in seq:
        enter, steady = t, t + f(enter_s)
        leave = steady + f(hold_s)
        exit_ = leave + f(leave_s)
        schedule.append(HeldItem(idx, enter, steady, leave, exit_))
        t = exit_ + f(gap_s)
    return Scene(items=sized, schedule=tuple(schedule), n_frames=t, width=width, height=height, fps=fps,
                 noise_sigma=noise_sigma, seed=seed)


def write_video(scene: Scene, path: Path, fourcc: str = "MJPG") -> Path:
    """Write the scene to ``path`` (.avi with MJPG, or .mp4 with mp4v); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), scene.fps,
                             (scene.width, scene.height))
    if not writer.isOpened():
        raise OSError(f"cannot write video {path} with fourcc {fourcc}")
    try:
        for frame in scene.frames():
            writer.write(frame)
    finally:
        writer.release()
    return path


def render_items(n: int, size: int = 200, seed: int = 0) -> list[Image]:
    """``n`` distinct catalog-like product images: coloured packs with a shape and a label."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        hue = int(180 * k / max(1, n)) % 180
        base = _hsv_bgr(hue, 200, 220)
        accent = _hsv_bgr((hue + 90) % 180, 230, 160)
        img = np.full((size, int(size * 0.75), 3), base, np.uint8)
        h, w = img.shape[:2]
        shape = k % 4
        c = (w // 2, h // 2 - h // 10)
        if shape == 0:
            cv2.circle(img, c, w // 4, accent, -1)
        elif shape == 1:
            cv2.rectangle(img, (w // 4, h // 5), (3 * w // 4, h // 2), accent, -1)
        elif shape == 2:
            pts = np.array([[w // 2, h // 8], [w // 5, h // 2], [4 * w // 5, h // 2]], np.int32)
            cv2.fillPoly(img, [pts], accent)
        else:
            cv2.ellipse(img, c, (w // 3, h // 8), int(rng.integers(0, 180)), 0, 360, accent, -1)
        band = (k * 37) % 3
        cv2.rectangle(img, (0, h - h // 4 - band * 6), (w, h - h // 6), tuple(255 - v for v in base), -1)
        cv2.putText(img, f"SKU{k:02d}", (6, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (20, 20, 20), 2)
        cv2.rectangle(img, (0, 0), (w - 1, h - 1), (30, 30, 30), 2)
        out.append(img)
    return out


def store_photo(img: Image, seed: int = 0, size: int = 320) -> Image:
    """``img`` as a store photo shows it: off-centre on a shelf backdrop, tilted, rescaled, other light."""
    # cloud.retrieval_augment makes such views for catalogs; the kiosk package never imports cloud.
    rng = np.random.default_rng(seed)
    out = _background(size, size, rng)
    scale = float(rng.uniform(0.55, 0.8)) * size / max(img.shape[:2])
    angle = float(rng.uniform(-10.0, 10.0))
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    rot[:, 2] += (size / 2 - w / 2, size / 2 - h / 2) + rng.uniform(-0.08, 0.08, 2) * size
    cv2.warpAffine(img, rot, (size, size), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
    lit = cv2.convertScaleAbs(out, alpha=float(rng.uniform(0.8, 1.15)), beta=float(rng.uniform(-15, 15)))
    noisy: Image = np.clip(lit + rng.normal(0.0, 3.0, lit.shape), 0, 255).astype(np.uint8)
    return noisy


def _hsv_bgr(h: int, s: int, v: int) -> tuple[int, int, int]:
    px = cv2.cvtColor(np.array([[[h, s, v]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(px[0]), int(px[1]), int(px[2])


def load_item_images(paths: Sequence[Path], size: int = 200) -> list[Image]:
    """Read product photos for a scene (e.g. grocery val photos); unreadable files raise OSError."""
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"cannot read image {p}")
        out.append(_fit(img, size))
    return out


def _fit(img: Image, size: int) -> Image:
    h, w = img.shape[:2]
    s = size / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return img
    out: Image = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return out


def _background(width: int, height: int, rng: np.random.Generator) -> Image:
    """A store-ish backdrop: a vertical gradient wall with shelf stripes and a few blurred boxes."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array([200, 190, 180], np.float32), np.array([120, 130, 140], np.float32)
    img = (top * (1 - y) + bottom * y) * np.ones((1, width, 1), np.float32)
    out = img.astype(np.uint8)
    for shelf_y in range(height // 6, height, height // 3):
        cv2.rectangle(out, (0, shelf_y), (width, shelf_y + 8), (90, 80, 70), -1)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        colour = tuple(int(v) for v in rng.integers(60, 200, 3))
        x1, y1 = x0 + int(rng.integers(15, 40)), y0 + int(rng.integers(20, 45))
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, -1)
    return cv2.GaussianBlur(out, (5, 5), 0)


def _paste(dst: Image, src: Image, cx: int, cy: int) -> None:
    """Paste ``src`` centred at (cx, cy), clipped to ``dst``."""
    h, w = src.shape[:2]
    x0, y0 = cx - w // 2, cy - h // 2
    dx0, dy0 = max(0, x0), max(0, y0)
    dx1, dy1 = min(dst.shape[1], x0 + w), min(dst.shape[0], y0 + h)
    if dx1 <= dx0 or dy1 <= dy0:
        return
    dst[dy0:dy1, dx0:dx1] = src[dy0 - y0 : dy1 - y0, dx0 - x0 : dx1 - x0]
