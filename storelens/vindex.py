"""The vector index both sides share: hnswlib, inner product on unit vectors, ef always set.

hnswlib does not persist ``ef`` (after ``load_index`` it is 10) and its loader only checks structure,
so every load goes through :func:`check_header` first and :func:`load` sets ``ef`` itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

# hnswlib 0.8 saveIndex header: 6 x size_t, int maxlevel, uint32 enterpoint, 3 x size_t, double, size_t
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_LABEL_BYTES = 8  # hnswlib labeltype is size_t


class IndexFileError(Exception):
    """An index file is truncated, corrupt or does not match the expected dimension/count."""


@dataclass(frozen=True, slots=True)
class IndexHeader:
    max_elements: int
    count: int
    dim: int
    M: int
    ef_construction: int


def check_header(path: Path, *, dim: int, count: int | None) -> IndexHeader:
    """Parse and sanity-check an hnswlib index header without letting hnswlib touch the file."""
    size = Path(path).stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise IndexFileError(f"index file is {size} bytes, shorter than its header")
    (off_l0, max_el, cur, size_per, label_off, off_data, maxlevel, enter, max_m, max_m0, m, mult, efc) = (
        _HEADER.unpack(raw)
    )
    data_dim, rem = divmod(label_off - off_data, 4)
    problems = []
    if off_l0 != 0 or off_data < 4 or label_off <= off_data or rem:
        problems.append("bad offsets")
    if data_dim != dim:
        problems.append(f"vector dim {data_dim} != expected {dim}")
    if cur > max_el:
        problems.append(f"count {cur} > max_elements {max_el}")
    if size_per != label_off + _LABEL_BYTES:
        problems.append("inconsistent element size")
    if not (2 <= m <= 256) or max_m != m or max_m0 != 2 * m:
        problems.append(f"implausible M={m}")
    if cur and not (0 <= enter < cur and 0 <= maxlevel < 64):
        problems.append("bad entry point")
    if not np.isfinite(mult):
        problems.append("bad level multiplier")
    if _HEADER.size + cur * size_per > size:
        problems.append("file shorter than its vectors")
    if count is not None and cur != count:
        problems.append(f"count {cur} != expected {count}")
    if problems:
        raise IndexFileError(f"{Path(path).name}: " + "; ".join(problems))
    return IndexHeader(max_elements=max_el, count=cur, dim=data_dim, M=m, ef_construction=efc)


class VectorIndex:
    """A loaded, ready-to-query index; treat as immutable once built or loaded (swap, never mutate)."""

    def __init__(self, index: object, dim: int, ef: int) -> None:
        self._index = index
        self.dim = dim
        self.ef = ef

    @property
    def count(self) -> int:
        return int(self._index.get_current_count())  # type: ignore[attr-defined]

    def search(
        self, queries: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top-k labels and cosine similarities for each query row (k is clipped to the live count)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, self.count))
        while True:
            try:
                labels, dist = self._index.knn_query(q, k=k, num_threads=1)  # type: ignore[attr-defined]
                break
            except RuntimeError:  # fewer live (non-deleted) elements than k
                if k == 1:
                    raise
                k -= 1
        return labels.astype(np.int64), (1.0 - dist).astype(np.float32)

    def save(self, path: Path) -> None:
        """Save the index (hnswlib format) to ``path``."""
        self._index.save_index(str(path))  # type: ignore[attr-defined]

    @property
    def raw(self) -> object:
        """The underlying hnswlib.Index (for deltas built off the hot path)."""
        return self._index


def build(
    vectors: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    *,
    M: int = 16,
    ef_construction: int = 200,
    ef: int = 64,
    seed: int = 100,
    threads: int = 1,
    max_elements: int | None = None,
) -> VectorIndex:
    """Build an inner-product HNSW index over unit vectors; with one thread, the same bytes every time."""
    # hnswlib draws each element's level from one unlocked random generator: concurrent adds give a
    # different index build after build (40 builds of 60 vectors on 2 threads: 23 distinct files), so a
    # rebuilt snapshot would not equal the one it replaces. Benchmarks may pass threads=-1 for speed.
    import hnswlib

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    idx = hnswlib.Index(space="ip", dim=dim)
    idx.init_index(
        max_elements=max(1, max_elements or n), M=M, ef_construction=ef_construction, random_seed=seed,
    )
    if n:
        idx.add_items(vectors, np.asarray(labels, dtype=np.int64), num_threads=threads)
    idx.set_ef(max(ef, 1))
    return VectorIndex(idx, dim, ef)


def load(path: Path, *, dim: int, ef: int, count: int | None = None, extra_capacity: int = 0) -> VectorIndex:
    """Check the header, load the index, and set ``ef`` (which hnswlib forgets on save)."""
    import hnswlib

    header = check_header(path, dim=dim, count=count)
    idx = hnswlib.Index(space="ip", dim=dim)
    try:
        idx.load_index(str(path), max_elements=header.count + extra_capacity)
    except RuntimeError as exc:
        raise IndexFileError(f"hnswlib refused {Path(path).name}: {exc}") from exc
    idx.set_ef(max(ef, 1))
    return VectorIndex(idx, dim, ef)


def exact_search(
    vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Brute-force top-k by inner product: the correctness oracle for tests and benchmarks."""
    sims = np.atleast_2d(queries).astype(np.float32) @ vectors.T.astype(np.float32)
    k = min(k, vectors.shape[0])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(part, order, axis=1)
    return top.astype(np.int64), np.take_along_axis(sims, top, axis=1)
