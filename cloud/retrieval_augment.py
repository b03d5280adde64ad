"""Augmented views of catalog images for fitting the retrieval adapter (cloud side, at snapshot build).

Store photos show items in piles, in hands and on shelves under shop lighting; catalog images are often
one product on white. Views here move catalog images towards that: random crops, flips, colour and
lighting jitter, and for images on white a background swap (the item cut out and composited onto
procedural clutter, alone or as a pile). Deterministic for a given seed.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

WHITE_LEVEL = 235  # a pixel whose channels all reach this counts as white background
ON_WHITE_BORDER_SHARE = 0.8  # an image whose border is this white is treated as a product shot on white
CANVAS_PX = 320  # composite size; the embedder resizes to its input anyway
MIN_CROP_AREA = 0.4  # random crops keep at least this share of the image: smaller loses the item


def is_on_white(img: U8) -> bool:
    """True for a product shot on a white background (judged by its one-pixel border)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return bool(np.mean(border.min(axis=1) >= WHITE_LEVEL) >= ON_WHITE_BORDER_SHARE)


def foreground_mask(img: U8) -> U8:
    """0..255 mask of the item: near-white regions connected to the border are background."""
    white = (img.min(axis=2) >= WHITE_LEVEL).astype(np.uint8)
    _, lab = cv2.connectedComponents(white, connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    bg = np.isin(lab, border[border > 0]) & (white > 0)
    mask = np.where(bg, 0, 255).astype(np.uint8)
    opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    out: U8 = np.asarray(cv2.GaussianBlur(opened, (5, 5), 0), dtype=np.uint8)
    return out


def _background(rng: np.random.Generator, size: int) -> F32:
    kind = int(rng.integers(4))
    if kind == 0:  # smooth colour field
        g = int(rng.integers(2, 8))
        field = rng.uniform(0, 255, (g, g, 3)).astype(np.float32)
        return np.asarray(cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC), np.float32)
    if kind == 1:  # shelf-like rectangles
        bg = np.empty((size, size, 3), np.float32)
        bg[:] = rng.uniform(60, 230, 3)
        for _ in range(int(rng.integers(3, 12))):
            x, y = rng.integers(0, size, 2)
            w, h = rng.integers(size // 10, size // 2, 2)
            bg[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
        return bg
    if kind == 2:  # dark crate with a lighting gradient
        shade = np.linspace(0.6, 1.2, size, dtype=np.float32)[:, None, None]
        return np.ones((size, size, 3), np.float32) * rng.uniform(10, 120, 3).astype(np.float32) * shade
    noisy = rng.uniform(50, 220, 3).astype(np.float32) + rng.normal(0, 25, (size, size, 1)).astype(np.float32)
    return np.asarray(cv2.GaussianBlur(noisy, (0, 0), rng.uniform(0.5, 3)), np.float32)


def _paste(canvas: F32, obj: U8, mask: U8, centre: tuple[float, float], scale: float, angle: float) -> None:
    h, w = obj.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[0, 2] += centre[0] - w / 2
    m[1, 2] += centre[1] - h / 2
    size = canvas.shape[0]
    warped = cv2.warpAffine(obj.astype(np.float32), m, (size, size))
    alpha = cv2.warpAffine(mask.astype(np.float32) / 255.0, m, (size, size))[:, :, None]
    canvas[:] = canvas * (1 - alpha) + warped * alpha


def jitter(img: U8, rng: np.random.Generator) -> U8:
    """Brightness, contrast, saturation, hue, white balance and occasional blur."""
    x = img.astype(np.float32) * rng.uniform(0.6, 1.3) + rng.uniform(-30, 30)
    hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[:, :, 1] *= rng.uniform(0.7, 1.3)
    hsv[:, :, 0] = (hsv[:, :, 0] + rng.uniform(-4, 4)) % 180
    x = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    x *= rng.uniform(0.9, 1.1, 3).astype(np.float32)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.5))
    out: U8 = np.clip(x, 0, 255).astype(np.uint8)
    return out


def random_crop(img: U8, rng: np.random.Generator, min_area: float = MIN_CROP_AREA) -> U8:
    """A random crop of ``min_area``..1 of the image, aspect 3:4..4:3."""
    h, w = img.shape[:2]
    area = rng.uniform(min_area, 1.0) * h * w
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = max(1, int(min(w, np.sqrt(area * ratio))))
    ch = max(1, int(min(h, np.sqrt(area / ratio))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop: U8 = img[y : y + ch, x : x + cw]
    return crop


def _composite(img: U8, rng: np.random.Generator, pile: bool) -> U8:
    mask = foreground_mask(img)
    ys, xs = np.nonzero(mask > 127)
    if len(ys) == 0:
        return random_crop(img, rng)
    obj = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    mk = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    s = CANVAS_PX
    canvas = _background(rng, s)
    base = s / max(obj.shape[:2])
    if pile:  # many copies filling the frame, one near the centre on top
        scale = base * rng.uniform(0.3, 0.6)
        for _ in range(int(rng.integers(4, 12))):
            centre = (rng.uniform(0, s), rng.uniform(0, s))
            _paste(canvas, obj, mk, centre, scale * rng.uniform(0.8, 1.2), rng.uniform(0, 360))
        top = (rng.uniform(0.3, 0.7) * s, rng.uniform(0.3, 0.7) * s)
        _paste(canvas, obj, mk, top, scale, rng.uniform(0, 360))
    else:  # one item, large and nearly upright (held up or on a shelf)
        centre = (rng.uniform(0.35, 0.65) * s, rng.uniform(0.35, 0.65) * s)
        _paste(canvas, obj, mk, centre, base * rng.uniform(0.55, 1.1), rng.uniform(-25, 25))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def augmented_views(img: U8, n: int, seed: int) -> list[U8]:
    """``n`` store-like views of one catalog image (uint8 BGR), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    on_white = is_on_white(img)
    out: list[U8] = []
    for i in range(n):
        if on_white and i % 4 != 3:
            view = _composite(img, rng, pile=i % 4 == 0)
        else:
            view = random_crop(img, rng)
        if rng.random() < 0.5:
            view = view[:, ::-1]
        out.append(jitter(np.ascontiguousarray(view), rng))
    return out
