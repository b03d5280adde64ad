"""Image decoding that refuses bad input early: empty, non-image, truncated, or decompression bombs."""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import BadImage

_LOGGER = logging.getLogger(__name__)

# 40 MP covers any phone photo (a 108 MP sensor bins to 12 MP) while capping decode memory at ~120 MB.
DEFAULT_MAX_PIXELS = 40_000_000
# 50 MiB: a 40 MP JPEG at quality 100 is ~20 MiB; anything bigger is not a photo we want.
DEFAULT_MAX_BYTES = 50 << 20
# Bumped when the pixels decode_image returns for some input change (2: transparency onto white), so
# caches keyed by image bytes (cloud.cache) do not serve vectors and thumbnails of the old pixels.
DECODE_VERSION = 2


# JPEG start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC): they carry the frame's height and width.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a baseline/progressive JPEG's SOF segment; None if the markers look unusual.

    ~2 us against ~30 us for PIL's parser (which holds the GIL) on a catalog photo. Unusual marker
    sequences go to PIL. Tables are not parsed here: a corrupt one is refused by the decode itself (libjpeg,
    then PIL), and the decoded size must still match this header.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0xD8, 0xD9, 0xDA) or 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):
            return None  # SOI again, EOI or scan before a frame header, stray RST/TEM: leave it to PIL
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if length < 8 or i + 9 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height) if width and height else None  # height 0 (DNL): PIL decides
        i += 2 + length
    return None


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _has_alpha(img: Image.Image) -> bool:
    """Transparency to composite; high-bit-depth modes (PIL would clip them to white) stay with OpenCV."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return False
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _pil_reason(exc: BaseException) -> str:
    """PIL's message without the Python repr of the buffer it read (``<_io.BytesIO object at 0x..>``)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a known image format"
    return _REPR.sub("the image", str(exc)) or type(exc).__name__


def _header_size(data: bytes) -> tuple[int, int, str, bool]:
    """(width, height, format, has transparency) from the header only; no pixel data is decoded."""
    jpeg = _jpeg_header_size(data)
    if jpeg is not None:
        return jpeg[0], jpeg[1], "JPEG", False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return int(img.width), int(img.height), str(img.format), _has_alpha(img)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image is a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"not a readable image: {_pil_reason(exc)}") from exc


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Decode encoded image bytes to a contiguous uint8 HxWx3 BGR array; BadImage on anything else."""
    if not data:
        raise BadImage("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise BadImage(f"image is {len(data)} bytes, more than the limit of {max_bytes}")
    width, height, fmt, alpha = _header_size(data)
    if width < 1 or height < 1:
        raise BadImage(f"image header claims {width}x{height} pixels")
    if width * height > max_pixels:
        raise BadImage(f"image claims {width}x{height} pixels, more than the limit of {max_pixels}")
    if fmt == "JPEG" and not _jpeg_complete(data):
        raise BadImage("JPEG data is truncated (no end-of-image marker after the last scan)")
    # A product cut out on a transparent background (the usual e-commerce PNG) goes onto white, as studio
    # shots are: OpenCV would drop the alpha and leave whatever the transparent pixels hold (often black).
    img = _decode_with_pil(data) if alpha else None
    if img is None:
        # IMREAD_COLOR: 8-bit BGR whatever the source (gray, 16-bit), EXIF orientation applied.
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        img = _decode_with_pil(data)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise BadImage(f"decoded {fmt} image has unsupported shape {img.shape} / {img.dtype}")
    if sorted(img.shape[:2]) != sorted((height, width)):
        raise BadImage(f"decoded {fmt} image is {img.shape[1]}x{img.shape[0]}, header said {width}x{height}")
    return np.ascontiguousarray(img)


def _jpeg_complete(data: bytes) -> bool:
    """True when an EOI marker follows the last start-of-scan; libjpeg only warns on truncation.

    Searched from the last EOI (normally the final two bytes): some scan starts before it and none after
    it. Same answer as searching back for the last scan (an EXIF thumbnail's own EOI is followed by the
    main image's scan), without scanning the whole entropy-coded data twice (27 us -> ~1 us per photo).
    """
    eoi = data.rfind(b"\xff\xd9")
    return eoi >= 0 and data.find(b"\xff\xda", 0, eoi) >= 0 and data.find(b"\xff\xda", eoi + 2) < 0


def _decode_with_pil(data: bytes) -> np.ndarray:
    """Images with transparency (composited onto white) and formats OpenCV lacks or refuses; truncation
    is an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if _has_alpha(img):
                    upright = ImageOps.exif_transpose(img)  # as OpenCV's IMREAD_COLOR does
                    white = Image.new("RGBA", upright.size, (255, 255, 255, 255))
                    rgb = np.asarray(Image.alpha_composite(white, upright.convert("RGBA")).convert("RGB"))
                else:
                    rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"image data is truncated or corrupt: {_pil_reason(exc)}") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])


def load_image(
    path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Read and decode an image file; BadImage naming the path."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise BadImage(f"{path}: cannot read: {exc}") from exc
    try:
        return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except BadImage as exc:
        raise BadImage(f"{path}: {exc}") from exc
