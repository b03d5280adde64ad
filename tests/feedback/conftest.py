"""Feedback test helpers: messages as kiosks build them, a published-snapshots folder, a publisher."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storelens.archive import pack
from storelens.feedback import FeedbackEvent, make_feedback
from storelens.snapshot import MANIFEST, SIGNATURE
from tests.deploy.mqtt_peer import Peer
from tests.support.mosquitto import Mosquitto

MODEL = "ab" * 32
STORE = "s1"


def jpeg(seed: int = 0, side: int = 64) -> bytes:
    """A real JPEG of random pixels (each seed gives other bytes)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def flat_jpeg(width: int, height: int) -> bytes:
    """A one-colour JPEG: a few hundred bytes whatever its size in pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def feedback(kiosk: str = "k1", seed: int = 0, **kw: object) -> FeedbackEvent:
    """A valid confirmed answer from ``kiosk`` of store s1, answered with MODEL / snapshot v3."""
    args: dict[str, object] = dict(
        store=STORE, kiosk=kiosk, match_id=f"m{seed}", answer="confirmed", chosen_sku="SKU-1",
        shown=["SKU-2", "SKU-1"], model=MODEL, snapshot=3, vector=np.linspace(-1, 1, 64),
        crop_jpeg=jpeg(seed),
    )
    args.update(kw)
    return make_feedback(**args)  # type: ignore[arg-type]


def publish_snapshot_archive(root: Path, store: str, version: int, model_id: str) -> Path:
    """What `catalog publish --to file://ROOT` leaves: ROOT/{store}/v{N}/snapshot.tar, manifest first."""
    src = root.parent / f"src-{store}-{version}"
    src.mkdir(parents=True)
    (src / MANIFEST).write_text(json.dumps({"format": "storelens.snapshot/1", "store": store,
                                            "version": version, "model_id": model_id}))  # fmt: skip
    (src / SIGNATURE).write_bytes(b"\0" * 64)
    out = root / store / f"v{version}" / "snapshot.tar"
    out.parent.mkdir(parents=True)
    pack(src, out)
    return out


@pytest.fixture
def snapshots(tmp_path: Path) -> Path:
    """A published-snapshots folder holding s1 v3 built with MODEL."""
    root = tmp_path / "published"
    publish_snapshot_archive(root, STORE, 3, MODEL)
    return root


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Peer]:
    """A kiosk-side MQTT client that waits for each PUBACK."""
    p = Peer("127.0.0.1", broker.port, f"t-pub-{uuid.uuid4().hex[:8]}").connect()
    yield p
    p.close()
