"""The catalog build's embedding cache: (image sha256, model fingerprint) -> vector, and thumbnails.

SQLite (WAL) in the build's cache directory, shared across stores and rebuilds: a rebuild after a small
catalog change embeds only the changed images. Both tables key an image by its sha256 and
``models.images.DECODE_VERSION`` (``_pixels_key``), so pixels decoded differently by a newer decoder are
never served from an older build's rows.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.images import DECODE_VERSION


class EmbeddingCache:
    """(image sha256, model fingerprint) -> vector, plus sha256 -> thumbnail JPEG; thread-safe."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS emb (sha TEXT, model TEXT, vec BLOB, PRIMARY KEY (sha, model))"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS thumb (sha TEXT PRIMARY KEY, jpeg BLOB)")
        self._db.commit()

    def get(self, sha: str, model: str, dim: int) -> npt.NDArray[np.float32] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT vec FROM emb WHERE sha=? AND model=?", (_pixels_key(sha), model)
            ).fetchone()
        if row is None or len(row[0]) != 4 * dim:
            return None
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def put(self, sha: str, model: str, vec: npt.NDArray[np.float32]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
                (_pixels_key(sha), model, vec.astype("<f4").tobytes()),
            )

    def get_thumb(self, sha: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT jpeg FROM thumb WHERE sha=?", (_pixels_key(sha),)).fetchone()
        return bytes(row[0]) if row else None

    def put_thumb(self, sha: str, jpeg: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO thumb VALUES (?, ?)", (_pixels_key(sha), jpeg))

    def commit(self) -> None:
        with self._lock:
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.commit()
            self._db.close()


def _pixels_key(sha: str) -> str:
    """An image's rows are those of its bytes as the current decoder turns them into pixels."""
    return f"{sha}:d{DECODE_VERSION}"
