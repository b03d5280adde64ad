"""Test data for the review queue: snapshot folders in the kiosk's layout, seeded feedback, staff logins."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cloud.dashboard.staff import add_user
from cloud.feedback.store import FeedbackStore
from storelens.feedback import Answer, make_feedback
from storelens.snapshot import HnswParams, SnapshotManifest

STORE = "s042"
MODEL = "ab" * 32
STAFF = {"anna": "anna-pw-123", "ben": "ben-pw-4567"}
CATALOG = {"A100": ("Oat milk 1 l", (201, 166, 107)), "B200": ("Rye bread", (120, 80, 40)),
           "C300": ("Green tea", (60, 150, 70))}  # fmt: skip


def jpeg(color: tuple[int, int, int], side: int = 48, seed: int = 0) -> bytes:
    """A small JPEG of one colour with a little seeded noise (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(color, np.int16) + rng.integers(-8, 9, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_snapshot(root: Path, version: int, *, store: str = STORE, model_info: dict[str, str] | None = None,
                   skus: tuple[str, ...] = tuple(CATALOG)) -> Path:  # fmt: skip
    """A snapshot folder as a kiosk keeps it (``root/snapshots/v<version>-<sha12>/``): manifest, items,
    thumbnails. Unsigned: the dashboard only reads it for display."""
    folder = root / "snapshots" / f"v{version}-{'0123456789ab'}"
    (folder / "thumbs").mkdir(parents=True)
    rows = []
    for sku in skus:
        title, color = CATALOG[sku]
        (folder / "thumbs" / f"{sku}.jpg").write_bytes(jpeg(color))
        rows.append({"sku": sku, "title": title, "thumbnail": f"thumbs/{sku}.jpg"})
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = SnapshotManifest(
        store=store, version=version, model_id=MODEL, preprocessing_hash="p", model_dim=8, dim=8,
        item_count=len(rows), vector_count=len(rows), hnsw=HnswParams(M=16, ef_construction=100, ef=50),
        threshold=0.5, files={}, created_at="2026-11-20T10:00:00Z",
        extra={"model": model_info} if model_info else {},
    )
    (folder / "manifest.json").write_text(json.dumps(m.model_dump(mode="json")))
    return folder


def seed(feedback_dir: Path, answer: Answer, chosen: str | None, n: int, *, store: str = STORE,
         kiosk: str = "k01") -> str:  # fmt: skip
    """Put one feedback message (a generated crop) into the store; returns its record id."""
    color = CATALOG[chosen][1] if chosen else (90, 90, 200)
    msg = make_feedback(store=store, kiosk=kiosk, match_id=f"m{n}", answer=answer, chosen_sku=chosen,
                        shown=list(CATALOG), model=MODEL, snapshot=1, vector=np.linspace(-1, 1, 8),
                        crop_jpeg=jpeg(color, seed=n), id=f"fb{n}", top_score=0.8)  # fmt: skip
    rid, _ = FeedbackStore(feedback_dir).put(msg)
    return rid


def staff_file(path: Path) -> Path:
    for name, pw in STAFF.items():
        add_user(path, name, pw)
    return path
