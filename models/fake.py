"""A deterministic embedder without a model: for benches, demos and kiosks that have no bundle yet."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import cv2
import numpy as np

from models.embedder import check_crop

_LOGGER = logging.getLogger(__name__)

_THUMB = 16  # 16x16x3 = 768 inputs: enough to tell colours and coarse shapes apart, cheap to compute


class FakeEmbedder:
    """16x16 colour thumbnail -> fixed seeded random projection -> L2-normalised (dim, model_id, embed)."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.seed = seed
        rng = np.random.default_rng(seed)
        self._projection = (rng.standard_normal((_THUMB * _THUMB * 3, dim)) / np.sqrt(dim)).astype(np.float32)
        self.model_id = hashlib.sha256(f"storelens.fake/1 dim={dim} seed={seed}".encode()).hexdigest()

    def embed_one(self, crop: np.ndarray) -> np.ndarray:
        """(dim,) float32 unit vector."""
        arr = check_crop(crop)
        thumb = cv2.resize(arr, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
        centred = thumb.reshape(-1) / 255.0 - 0.5  # centre so dark and bright crops do not all align
        vec = centred @ self._projection
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            vec = np.zeros(self.dim, dtype=np.float32)
            vec[0] = 1.0
            return vec
        unit: np.ndarray = (vec / norm).astype(np.float32)
        return unit

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit rows in the order of ``crops``."""
        out = np.empty((len(crops), self.dim), dtype=np.float32)
        for i, crop in enumerate(crops):
            out[i] = self.embed_one(crop)
        return out
