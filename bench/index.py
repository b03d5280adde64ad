"""k-NN bench: hnswlib build, query p50/p99 and recall@10 against exact numpy; bytes per catalog vector.

Synthetic clustered unit vectors (a product catalog is clusters of near-duplicate photos), queried one at
a time as a kiosk searches. ``sizes``: 10k x 512, 10k x 2048 and 100k x 2048 (the issue's target row:
p99 <= 1 ms at recall@10 >= 0.99), M 16, ef_construction 200. ``pca``: bytes and recall@10 lost when
10k x 2048 is reduced to 256 dims by a catalog-fitted PCA.

``million``: 1M catalog vectors at the dimension a large snapshot ships: 256, the LDA adapter's cap
(``cloud.retrieval.MAX_OUT_DIM``; 1 KB of floats per image, the issue's "near 1 KB per image"; the grocery
snapshot ships 80 because it has 81 items). The vectors are generated in 2048 dims (ResNet-50's pooled
features) chunk by chunk, never all at once; a PCA fitted on the first 20k (centred, not whitened:
whitening would lift the noise components to the weight of the signal) reduces them. Recall@10 is
reported against exact numpy in 256 dims (what hnswlib loses) and in the raw 2048 dims (hnswlib plus the
reduction; that ground truth is streamed chunk by chunk). M 16 as snapshots are built; ef_construction 64
to fit the bench's time budget. Measured on 2 cores: the 1M build takes 2.1-2.3 min at 64 (recall@10
0.98-1.0 at ef 32, >= 0.99 from ef 64 at p99 0.49 ms; 2-thread builds are not deterministic) and 6.4 min
at the snapshot builder's 200 (1.0 from ef 32, p99 0.56 ms). ``chosen`` is the smallest ef reaching 0.99.
The data's 48-dim latent structure makes it easy and the reduction's loss (0.2 points here) optimistic
for real embeddings; the grocery eval (``make eval``) measures quality.
Not built: 1M x 2048 (7.6 GiB of raw float32 vectors, ~8.3 KB per vector as an hnswlib file).
``BENCH_FULL=1`` (or ``run(full=True)``) adds 100k x 512, 1M x 512, and the 1M row at ef_construction 200.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from storelens import vindex

_LOGGER = logging.getLogger(__name__)

K = 10
QUERIES = 300  # one at a time, as a kiosk searches
EFS = (32, 64, 100, 200)
RECALL_TARGET = 0.99
LATENT_DIM = 48  # CNN embeddings live near a low-dimensional manifold; isotropic noise in all d dims does not
CHUNK = 20_000  # vectors generated (and streamed through exact search) at a time

MILLION = 1_000_000
MILLION_RAW_DIM = 2048  # ResNet-50's pooled features
MILLION_DIM = 256  # shipped after reduction: 1 KB of float32 per image
MILLION_FIT = 20_000  # catalog vectors the PCA is fitted on
MILLION_EFS = (32, 64, 100, 200, 400)
MILLION_EF_CONSTRUCTION = 64  # 2.2 min build instead of 6.4 at 200; queries then need ef 64 (see above)

Floats = npt.NDArray[np.float32]


class _Catalog:
    """Items (clusters of ~20 views) in a 48-d latent space, mapped linearly into ``dim`` dims, plus a
    little isotropic noise. Isotropic noise in every dimension (an earlier version) has no structure at
    all: ANN recall collapses and PCA cannot work, unlike on real embeddings."""

    def __init__(self, n: int, dim: int, seed: int, *, fast_noise: bool = False) -> None:
        self.n, self.dim, self._fast_noise = n, dim, fast_noise
        self._rng = np.random.default_rng(seed)
        self.centres = self._rng.standard_normal((max(1, n // 20), LATENT_DIM)).astype(np.float32)
        self.lift = (self._rng.standard_normal((LATENT_DIM, dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)

    def _views(self, rng: np.random.Generator, m: int) -> Floats:
        z = self.centres[rng.integers(0, len(self.centres), m)] + 0.35 * rng.standard_normal(
            (m, LATENT_DIM), np.float32
        )
        x: Floats = z @ self.lift
        if self._fast_noise:  # uniform int8 noise of the same variance: 10x faster than normal at 1M x 2048
            x += rng.integers(-128, 128, (m, self.dim), dtype=np.int8).astype(np.float32) * (0.05 / 73.9)
        else:
            x += 0.05 * rng.standard_normal((m, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self) -> Iterator[Floats]:
        """The catalog's n unit vectors, CHUNK rows at a time (call once)."""
        for start in range(0, self.n, CHUNK):
            yield self._views(self._rng, min(CHUNK, self.n - start))

    def new_views(self, m: int, seed: int) -> Floats:
        """Another photo of m random catalog items each (what a kiosk query is)."""
        return self._views(np.random.default_rng(seed), m)


def clustered(n: int, dim: int, seed: int = 0) -> Floats:
    """n unit vectors shaped like image embeddings (see _Catalog)."""
    return np.concatenate(list(_Catalog(n, dim, seed).chunks()))


def _queries(x: Floats, seed: int = 1) -> Floats:
    """A held-out view of a catalog item: a catalog vector moved a little (another photo of it)."""
    rng = np.random.default_rng(seed)
    q: Floats = x[rng.integers(0, len(x), QUERIES)] + 0.02 * rng.standard_normal(
        (QUERIES, x.shape[1]), dtype=np.float32
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def _recall(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def _sweep(index: vindex.VectorIndex, q: Floats, truths: Callable[[], dict[str, npt.NDArray[np.int64]]],
           efs: tuple[int, ...]) -> list[dict[str, Any]]:  # fmt: skip
    """Query one at a time at each ef: p50/p99 latency, then recall@10 against each ground truth.

    ``truths`` is called only after every timed query: an exact search run just before (a 100k x 2048
    matmul) left the p99 of the next 300 queries at 1.2-2.2 ms instead of 0.73-0.88 (measured three times
    each way), which no kiosk would see: it never runs one.
    """
    raw: Any = index.raw
    timed = []
    for ef in efs:
        raw.set_ef(ef)
        lat = []
        found = np.empty((len(q), K), np.int64)
        for i in range(len(q)):
            s = time.perf_counter()
            labels, _ = raw.knn_query(q[i : i + 1], k=K, num_threads=1)
            lat.append((time.perf_counter() - s) * 1e3)
            found[i] = labels[0]
        timed.append((ef, found, lat))
    exact = truths()
    sweep = []
    for ef, found, lat in timed:
        row: dict[str, Any] = {"ef": ef}
        row |= {name: round(_recall(found, t), 4) for name, t in exact.items()}
        row |= {
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
        }
        sweep.append(row)
    return sweep


def _file_bytes(index: vindex.VectorIndex, out_dir: Path, name: str) -> int:
    path = out_dir / name
    try:
        index.save(path)
        return path.stat().st_size
    finally:
        path.unlink(missing_ok=True)


def bench_size(n: int, dim: int, out_dir: Path) -> dict[str, Any]:
    """Build one index and sweep ef; report the smallest ef reaching the recall target."""
    x = clustered(n, dim)
    q = _queries(x)
    t0 = time.perf_counter()
    index = vindex.build(x, np.arange(n, dtype=np.int64), M=16, ef_construction=200, threads=-1)
    build_s = time.perf_counter() - t0
    exact: dict[str, float] = {}

    def truth() -> dict[str, npt.NDArray[np.int64]]:
        t0 = time.perf_counter()
        ids, _ = vindex.exact_search(x, q, K)
        exact["ms"] = (time.perf_counter() - t0) / QUERIES * 1e3
        return {"recall@10": ids}

    sweep = _sweep(index, q, truth, EFS)
    exact_ms = exact["ms"]
    # Saved after the timed queries: writing back a freshly saved 800 MB file slowed the p99 of queries.
    size = _file_bytes(index, out_dir, f"index_{n}x{dim}.bin")
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


def _pca(sample: Floats, out_dim: int) -> tuple[Floats, Floats]:
    """(mean, in_dim x out_dim components) of a catalog sample; eigh of the covariance (faster than SVD)."""
    mu = sample.mean(axis=0)
    c = sample - mu
    _, vecs = np.linalg.eigh((c.T @ c).astype(np.float64))
    return mu.astype(np.float32), np.ascontiguousarray(vecs[:, ::-1][:, :out_dim], dtype=np.float32)


def _project(x: Floats, mu: Floats, w: Floats) -> Floats:
    p = x @ w - mu @ w  # (x - mu) @ w without a copy of x
    out: Floats = (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)
    return out


def pca_bytes(n: int = 10_000, dim: int = 2048, out_dim: int = 256) -> dict[str, Any]:
    """Bytes per vector and recall@10 loss when a catalog-fitted PCA reduces dim -> out_dim."""
    x = clustered(n, dim, seed=3)
    q = _queries(x, seed=4)
    truth, _ = vindex.exact_search(x, q, K)
    mu, w = _pca(x[:5000], out_dim)
    found, _ = vindex.exact_search(_project(x, mu, w), _project(q, mu, w), K)
    return {
        "raw_bytes_per_vector": dim * 4,
        "pca_bytes_per_vector": out_dim * 4,
        "out_dim": out_dim,
        "recall@10_vs_raw_exact": round(_recall(found, truth), 4),
    }


class _TopK:
    """Streaming exact top-K by inner product over row chunks (ground truth without holding all rows)."""

    def __init__(self, q: Floats) -> None:
        self._q = q
        self.ids = np.full((len(q), K), -1, np.int64)
        self._sims = np.full((len(q), K), -np.inf, np.float32)

    def add(self, rows: Floats, first_id: int) -> None:
        sims = self._q @ rows.T
        part = np.argpartition(-sims, K - 1, axis=1)[:, :K]
        all_sims = np.concatenate([self._sims, np.take_along_axis(sims, part, axis=1)], axis=1)
        all_ids = np.concatenate([self.ids, part + first_id], axis=1)
        best = np.argsort(-all_sims, axis=1)[:, :K]
        self._sims = np.take_along_axis(all_sims, best, axis=1)
        self.ids = np.take_along_axis(all_ids, best, axis=1)


def million(
    out_dir: Path, *, n: int = MILLION, dim: int = MILLION_DIM, ef_construction: int = MILLION_EF_CONSTRUCTION
) -> dict[str, Any]:
    """1M catalog vectors generated in 2048 dims, reduced by a catalog-fitted PCA, indexed and queried."""
    t_start = time.perf_counter()
    catalog = _Catalog(n, MILLION_RAW_DIM, seed=5, fast_noise=True)
    q_raw = catalog.new_views(QUERIES, seed=6)
    raw_truth = _TopK(q_raw)
    reduced = np.empty((n, dim), np.float32)
    mu: Floats | None = None
    w: Floats | None = None
    start = 0
    for chunk in catalog.chunks():
        if mu is None or w is None:
            mu, w = _pca(chunk[:MILLION_FIT], dim)
        raw_truth.add(chunk, start)
        reduced[start : start + len(chunk)] = _project(chunk, mu, w)
        start += len(chunk)
    assert mu is not None and w is not None
    q = _project(q_raw, mu, w)
    gen_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    truth = _TopK(q)
    for s in range(0, n, 100_000):
        truth.add(reduced[s : s + 100_000], s)
    exact_ms = (time.perf_counter() - t0) / QUERIES * 1e3
    _LOGGER.info("1M: generated and reduced in %.0f s; building", gen_s)
    t0 = time.perf_counter()
    index = vindex.build(reduced, np.arange(n, dtype=np.int64), M=16, ef_construction=ef_construction,
                         threads=-1)
    build_s = time.perf_counter() - t0
    del reduced
    sweep = _sweep(index, q, lambda: {"recall@10": truth.ids, "recall@10_vs_raw_exact": raw_truth.ids},
                   MILLION_EFS)  # fmt: skip
    size = _file_bytes(index, out_dir, f"index_{n}x{dim}.bin")
    chosen = next((s for s in sweep if s["recall@10"] >= RECALL_TARGET), sweep[-1])
    return {
        "n": n,
        "raw_dim": MILLION_RAW_DIM,
        "dim": dim,
        "reduction": f"PCA fitted on the first {MILLION_FIT} catalog vectors (centred, not whitened)",
        "queries": "another view of a random catalog item, one at a time",
        "M": 16,
        "ef_construction": ef_construction,
        "generate_and_reduce_s": round(gen_s, 1),
        "build_s": round(build_s, 1),
        "exact_batch_ms_per_query": round(exact_ms, 3),
        "reduction_recall@10_exact": round(_recall(truth.ids, raw_truth.ids), 4),
        "file_bytes": size,
        "bytes_per_vector": round(size / n),
        "sweep": sweep,
        "chosen": chosen,
        "not_built": "1M x 2048: 7.6 GiB of raw float32 vectors, ~8.3 GB as an hnswlib file",
    }


def run(out_dir: Path, *, full: bool | None = None) -> dict[str, Any]:
    """Run the bench; write index.json into ``out_dir`` and return the figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = bool(int(os.environ.get("BENCH_FULL", "0"))) if full is None else full
    sizes = [(10_000, 512), (10_000, 2048), (100_000, 2048)]
    if full:
        sizes[2:2] = [(100_000, 512)]
        sizes.append((1_000_000, 512))
    result: dict[str, Any] = {"sizes": [bench_size(n, d, out_dir) for n, d in sizes], "pca": pca_bytes()}
    result["million"] = million(out_dir)
    if full:
        result["million_efc200"] = million(out_dir, ef_construction=200)
    (out_dir / "index.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench")), indent=2))
