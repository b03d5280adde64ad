"""The snapshot's query projection (``projection.bin``): one definition for the cloud that fits and writes
it and the kiosk that applies it to every query. Format: little-endian float32 mean[in_dim] then
matrix[in_dim, out_dim]; a search vector is ``normalize((x - mean) @ matrix)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def normalize_rows(x: npt.ArrayLike) -> F32:
    """Rows scaled to unit length in float32 (all-zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


@dataclass(frozen=True, slots=True)
class Adapter:
    """A linear map applied to model-space vectors: ``normalize((x - mean) @ matrix)``."""

    mean: F32  # (in_dim,)
    matrix: F32  # (in_dim, out_dim)

    @property
    def in_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def identity(cls, dim: int) -> Adapter:
        """The no-op adapter (baseline: cosine in model space)."""
        return cls(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32))

    def apply(self, vectors: npt.ArrayLike) -> F32:
        """Project (n, in_dim) model-space vectors to unit (n, out_dim) search vectors."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[1] != self.in_dim:
            raise ValueError(f"vectors have {x.shape[1]} dims, adapter expects {self.in_dim}")
        return normalize_rows((x - self.mean) @ self.matrix)

    def to_bytes(self) -> bytes:
        """The snapshot's ``projection.bin``: little-endian f32 mean[in_dim] then matrix[in_dim, out_dim]."""
        return self.mean.astype("<f4").tobytes() + np.ascontiguousarray(self.matrix, dtype="<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, in_dim: int, out_dim: int) -> Adapter:
        """Parse ``projection.bin`` written by ``to_bytes``; ValueError on a size mismatch."""
        want = 4 * in_dim * (1 + out_dim)
        if len(data) != want:
            raise ValueError(f"projection is {len(data)} bytes, expected {want} for {in_dim}x{out_dim}")
        flat = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(flat).all():
            raise ValueError("projection holds non-finite values")
        return cls(flat[:in_dim].copy(), flat[in_dim:].reshape(in_dim, out_dim).copy())
