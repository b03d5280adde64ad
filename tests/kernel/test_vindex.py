"""The shared vector index: recall vs brute force, ef restored on load, hostile headers refused."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from storelens import vindex


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 50), dim))
    x = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_at_10_matches_brute_force(tmp_path: Path) -> None:
    """Guards an index that silently loses recall (e.g. ef left at hnswlib's default after load)."""
    x = _clustered(3000, 64)
    q = _clustered(200, 64, seed=1)
    idx = vindex.build(x, np.arange(len(x)), ef=100, threads=1)
    idx.save(tmp_path / "index.bin")
    loaded = vindex.load(tmp_path / "index.bin", dim=64, ef=100, count=3000)
    got, _ = loaded.search(q, 10)
    want, _ = vindex.exact_search(x, q, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.99


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    """Guards irreproducible snapshots: hnswlib's level draws race across threads, so a multi-threaded
    build of the same vectors differed from build to build (and a tamper test saw sizes differ)."""
    x = _clustered(60, 5)
    digests = set()
    for i in range(4):
        vindex.build(x, np.arange(60)).save(tmp_path / f"{i}.bin")
        digests.add((tmp_path / f"{i}.bin").read_bytes())
    assert len(digests) == 1


def test_scores_are_cosine_similarities(tmp_path: Path) -> None:
    """Guards a distance/similarity mix-up (hnswlib 'ip' returns 1 - dot)."""
    x = _clustered(100, 16)
    idx = vindex.build(x, np.arange(100) + 1000, ef=50)
    labels, sims = idx.search(x[:5], 1)
    assert labels[:, 0].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert np.allclose(sims[:, 0], 1.0, atol=1e-5)


def test_wrong_dim_and_truncation_refused_before_hnswlib(tmp_path: Path) -> None:
    """Guards hnswlib reading a file with the wrong dimension (it trusts the caller, then misreads)."""
    x = _clustered(200, 32)
    p = tmp_path / "index.bin"
    vindex.build(x, np.arange(200)).save(p)
    with pytest.raises(vindex.IndexFileError, match="dim 32 != expected 64"):
        vindex.load(p, dim=64, ef=10)
    with pytest.raises(vindex.IndexFileError, match="count"):
        vindex.check_header(p, dim=32, count=199)
    data = p.read_bytes()
    short = tmp_path / "short.bin"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(vindex.IndexFileError, match="shorter than its vectors"):
        vindex.check_header(short, dim=32, count=None)
    (tmp_path / "tiny.bin").write_bytes(b"\0" * 10)
    with pytest.raises(vindex.IndexFileError, match="shorter than its header"):
        vindex.check_header(tmp_path / "tiny.bin", dim=32, count=None)


def test_max_elements_below_count_refused(tmp_path: Path) -> None:
    """Guards hnswlib issue #673: a crafted header with max_elements < count overflows the heap."""
    p = tmp_path / "index.bin"
    vindex.build(_clustered(50, 8), np.arange(50)).save(p)
    data = bytearray(p.read_bytes())
    struct.pack_into("<Q", data, 8, 1)  # max_elements_
    p.write_bytes(bytes(data))
    with pytest.raises(vindex.IndexFileError, match="max_elements"):
        vindex.load(p, dim=8, ef=10)


def test_deleted_items_never_returned_and_k_clipped() -> None:
    """Guards a query for more neighbours than live items raising instead of answering."""
    x = _clustered(20, 8)
    idx = vindex.build(x, np.arange(20))
    for label in range(15):
        idx.raw.mark_deleted(label)  # type: ignore[attr-defined]
    labels, _ = idx.search(x[:1], 10)
    assert set(labels[0].tolist()) <= set(range(15, 20))
