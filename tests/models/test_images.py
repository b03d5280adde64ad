"""decode_image / load_image: bad bytes become BadImage, good ones uint8 HxWx3 BGR."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from models.errors import BadImage
from models.images import decode_image, load_image


def _photo(h: int = 40, w: int = 50) -> np.ndarray:
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def _encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return bytes(buf.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc


def test_decodes_jpeg_and_png_to_bgr() -> None:
    """A colour photo must come back BGR and the right size."""
    img = _photo()
    out = decode_image(_encode(img, ".png"))
    assert out.dtype == np.uint8 and out.shape == (40, 50, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, img)
    assert decode_image(_encode(img, ".jpg")).shape == (40, 50, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_gray_alpha_palette_become_bgr(mode: str) -> None:
    """Gray, alpha and palette images must still give 3 channels, not crash the embedder."""
    buf = io.BytesIO()
    Image.fromarray(_photo()[:, :, ::-1]).convert(mode).save(buf, "PNG")
    assert decode_image(buf.getvalue()).shape == (40, 50, 3)


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("WEBP", "RGBA"),
                                         ("GIF", "P")])  # fmt: skip
def test_transparent_background_becomes_white(fmt: str, mode: str) -> None:
    """A product cut out on transparency (e-commerce PNGs) lands on white like a studio shot, not on
    whatever the transparent pixels hold (black here): the kiosk thumbnail and the embedding see white."""
    rgba = np.zeros((40, 50, 4), np.uint8)  # transparent black everywhere ...
    rgba[10:30, 15:35] = (200, 30, 30, 255)  # ... but an opaque red product
    img = Image.fromarray(rgba)
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("RGB").quantize(4)
        img.info["transparency"] = int(np.asarray(img)[0, 0])  # the background's palette entry
    buf = io.BytesIO()
    img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 50, 3)
    assert (out[0, 0] == 255).all() and (out[39, 49] == 255).all(), out[0, 0]  # background: white
    b, _, r = out[20, 25].astype(int)
    if mode == "LA":
        assert r == b < 120  # the red product in gray
    else:
        assert r > 150 and b < 80  # still red (BGR)


def test_transparent_path_keeps_orientation_and_deep_grays() -> None:
    """The PIL path for transparency turns the image upright by its EXIF tag as OpenCV does, and leaves a
    16-bit image with a transparent key to OpenCV (PIL would clip it to white)."""
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[..., 3] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).shape == (40, 20, 3)
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10), 120 * 257, np.uint16)).save(buf, "PNG", transparency=0)
    assert decode_image(buf.getvalue())[0, 0].tolist() == [120, 120, 120]


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 30],
    ids=["empty", "text", "junk-png"],
)
def test_non_images_raise_bad_image(data: bytes) -> None:
    """Empty and non-image bytes must raise the typed BadImage, not return None or crash."""
    with pytest.raises(BadImage):
        decode_image(data)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_images_raise(ext: str) -> None:
    """A half-uploaded file must be refused, not decoded into a gray half-image."""
    data = _encode(_photo(200, 200), ext)
    with pytest.raises(BadImage):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_rejected_fast() -> None:
    """A 100-byte PNG claiming 65535x65535 pixels must be refused from its header, without allocating."""
    ihdr = struct.pack(">IIBBBBB", 65535, 65535, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + _png_chunk(b"IEND", b"")
    )
    start = time.perf_counter()
    with pytest.raises(BadImage, match=r"pixels|bomb"):
        decode_image(bomb)
    assert time.perf_counter() - start < 0.5


def test_limits_are_enforced() -> None:
    """max_pixels and max_bytes must refuse images just over them."""
    data = _encode(_photo(), ".png")
    with pytest.raises(BadImage, match="pixels"):
        decode_image(data, max_pixels=40 * 50 - 1)
    with pytest.raises(BadImage, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1)


def test_load_image_names_the_path(tmp_path: Path) -> None:
    """A bad file's error must say which file, so a catalog build can report it."""
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadImage, match=r"broken\.jpg"):
        load_image(bad)
    with pytest.raises(BadImage, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_errors_name_the_problem_not_a_python_repr() -> None:
    """PIL's 'cannot identify image file <_io.BytesIO object at 0x...>' reached operators as is."""
    from models.images import BadImage, decode_image

    for data in (b"GIF89a" + b"\x00" * 40, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"not an image at all"):
        with pytest.raises(BadImage) as err:
            decode_image(data)
        assert "object at 0x" not in str(err.value) and "BytesIO" not in str(err.value)
