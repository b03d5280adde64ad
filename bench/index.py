"""k-NN bench: hnswlib build, query p50/p99 and recall@10 against exact numpy; bytes per catalog vector.

Synthetic clustered unit vectors (a product catalog is clusters of near-duplicate photos). Default sizes
stay under ~3 minutes on 2 cores; ``BENCH_FULL=1`` (or ``run(full=True)``) adds 1M x 512.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from storelens import vindex

K = 10
QUERIES = 300  # one at a time, as a kiosk searches
EFS = (32, 64, 100, 200)
RECALL_TARGET = 0.99


LATENT_DIM = 48  # CNN embeddings live near a low-dimensional manifold; isotropic noise in all d dims does not


def clustered(n: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """n unit vectors shaped like image embeddings: items (clusters of ~20 views) in a 48-d latent space,
    mapped linearly into ``dim`` dims, plus a little isotropic noise. Isotropic noise in every dimension
    (an earlier version) has no structure at all: ANN recall collapses and PCA cannot work, unlike on real
    embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), LATENT_DIM)).astype(np.float32)
    lift = (rng.standard_normal((LATENT_DIM, dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 20_000):
        m = min(20_000, n - start)
        z = centres[rng.integers(0, len(centres), m)] + 0.35 * rng.standard_normal(
            (m, LATENT_DIM), np.float32
        )
        x[start : start + m] = z @ lift + 0.05 * rng.standard_normal((m, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _queries(x: npt.NDArray[np.float32], seed: int = 1) -> npt.NDArray[np.float32]:
    """A held-out view of a catalog item: a catalog vector moved a little (another photo of it)."""
    rng = np.random.default_rng(seed)
    q = x[rng.integers(0, len(x), QUERIES)] + 0.02 * rng.standard_normal(
        (QUERIES, x.shape[1]), dtype=np.float32
    )
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def bench_size(n: int, dim: int, out_dir: Path) -> dict[str, Any]:
    """Build one index and sweep ef; report the smallest ef reaching the recall target."""
    x = clustered(n, dim)
    q = _queries(x)
    t0 = time.perf_counter()
    truth, _ = vindex.exact_search(x, q, K)
    exact_ms = (time.perf_counter() - t0) / QUERIES * 1e3
    t0 = time.perf_counter()
    index = vindex.build(x, np.arange(n, dtype=np.int64), M=16, ef_construction=200)
    build_s = time.perf_counter() - t0
    path = out_dir / f"index_{n}x{dim}.bin"
    index.save(path)
    size = path.stat().st_size
    path.unlink()
    raw: Any = index.raw
    sweep = []
    for ef in EFS:
        raw.set_ef(ef)
        lat = []
        found = np.empty((QUERIES, K), np.int64)
        for i in range(QUERIES):
            s = time.perf_counter()
            labels, _ = raw.knn_query(q[i : i + 1], k=K, num_threads=1)
            lat.append((time.perf_counter() - s) * 1e3)
            found[i] = labels[0]
        sweep.append(
            {
                "ef": ef,
                "recall@10": round(_recall(found, truth), 4),
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
            }
        )
    chosen = next((s for s in sweep if s["recall@10"] >= RECALL_TARGET), sweep[-1])
    return {
        "n": n,
        "dim": dim,
        "build_s": round(build_s, 1),
        "exact_batch_ms_per_query": round(exact_ms, 3),
        "file_bytes": size,
        "bytes_per_vector": round(size / n),
        "sweep": sweep,
        "chosen": chosen,
    }


def pca_bytes(n: int = 10_000, dim: int = 2048, out_dim: int = 256) -> dict[str, Any]:
    """Bytes per vector and recall@10 loss when a catalog-fitted PCA reduces dim -> out_dim."""
    x = clustered(n, dim, seed=3)
    q = _queries(x, seed=4)
    truth, _ = vindex.exact_search(x, q, K)
    mu = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x[:5000] - mu, full_matrices=False)
    w = vt[:out_dim].T.astype(np.float32)

    def proj(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        p = (a - mu) @ w
        return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)

    found, _ = vindex.exact_search(proj(x), proj(q), K)
    return {
        "raw_bytes_per_vector": dim * 4,
        "pca_bytes_per_vector": out_dim * 4,
        "out_dim": out_dim,
        "recall@10_vs_raw_exact": round(_recall(found, truth), 4),
    }


def run(out_dir: Path, *, full: bool | None = None) -> dict[str, Any]:
    """Run the bench; write index.json into ``out_dir`` and return the figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = bool(int(os.environ.get("BENCH_FULL", "0"))) if full is None else full
    sizes = [(10_000, 512), (10_000, 2048), (100_000, 512), (100_000, 2048)]
    if full:
        sizes.append((1_000_000, 512))
    result: dict[str, Any] = {"sizes": [bench_size(n, d, out_dir) for n, d in sizes], "pca": pca_bytes()}
    (out_dir / "index.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench")), indent=2))
