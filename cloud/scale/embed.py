"""Catalog photos -> embeddings on Ray Data: ``map_batches`` over an actor pool, one compiled model each.

Each actor fetches its batch's photos (local path, ``file://``, ``s3://``, http(s) without the single
path's download cache), hashes them, skips those the shared Parquet cache already has (the driver sends
the cached keys once), decodes the rest safely, thumbnails first photos, embeds, and writes the new
vectors and thumbnails as one new cache shard before returning the batch: a worker killed later loses
nothing finished, and a job that dies resumes from the cache. A bad photo fails its row with a reason;
only a bug or a dead machine fails a batch (retried on a restarted actor, ``MAX_RESTARTS`` times).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cloud.catalog import FetchError, Item, fetch_image_bytes
from cloud.featurize import _Job, make_thumbnail
from cloud.scale.parquet_cache import ParquetCache
from models.port import EmbedderPort

_LOGGER = logging.getLogger(__name__)

# Photos per map_batches call, and so per cache shard. Larger: fewer shards to list (S3: one LIST per
# 1,000) and less per-call overhead; smaller: less lost when a worker dies, finer load balancing.
BATCH = 128
# Restarts of a dying actor (and retries of its batch) before the job fails; the cache keeps what
# finished, so a rerun resumes. Ray Data's default is forever: a photo that crashes the decoder natively
# would loop.
MAX_RESTARTS = 4


class EmbedderFactory(Protocol):
    """Makes the embedder inside each actor (picklable: it travels to the workers)."""

    def __call__(self, threads: int) -> EmbedderPort: ...
    def space(self) -> EmbeddingSpace: ...


@dataclass(frozen=True, slots=True)
class EmbeddingSpace:
    """What a snapshot build needs to know of the model, without compiling it (an EmbedderPort)."""

    dim: int
    model_id: str
    preprocessing_hash: str
    manifest: Any = None  # models.bundle.BundleManifest, shown by the dashboard

    def embed(self, crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        raise RuntimeError("an EmbeddingSpace names a model; it does not run it")


@dataclass(frozen=True, slots=True)
class BundleEmbedders:
    """The real factory: an OpenVINO Embedder of ``bundle`` on the actor's CPUs."""

    bundle: str

    def __call__(self, threads: int) -> EmbedderPort:
        from models.embedder import Embedder

        # One CPU: the latency hint (one stream, one request); more: the throughput hint on that many.
        if threads >= 2:
            return Embedder(Path(self.bundle), mode="throughput", threads=threads)
        return Embedder(Path(self.bundle), mode="latency", threads=1)

    def space(self) -> EmbeddingSpace:
        from models.bundle import verify_bundle

        m = verify_bundle(Path(self.bundle))
        return EmbeddingSpace(m.dim, m.model_id, m.preprocessing_hash, m)


def fingerprint(space: EmbeddingSpace) -> str:
    """The cache's model key, as ``cloud.featurize.model_fingerprint`` makes it."""
    return f"{space.model_id}:{space.preprocessing_hash}"


def _reason(error: str) -> str:
    """A short failure class for the summary (the full message stays in the report)."""
    if error.startswith("no such file"):
        return "missing"
    if error.startswith("zero-size"):
        return "empty"
    if error.startswith("embedding failed") or error.startswith("embedder returned"):
        return "embedding"
    if error.startswith(("cannot fetch", "larger than", "unsupported image source")):
        return "unreadable"
    return "corrupt"


class EmbedActor:
    """One Ray Data actor: a compiled model and a cache handle; ``__call__`` embeds one batch."""

    def __init__(
        self, factory: EmbedderFactory, base_dir: str, cache_uri: str | None, fp: str, dim: int, known: Any
    ) -> None:
        import ray

        from models.images import decode_image

        runtime: Any = ray.get_runtime_context()
        cpus = runtime.get_assigned_resources().get("CPU", 1.0)
        self._embedder = factory(max(1, int(cpus)))
        self._base_dir = Path(base_dir)
        self._cache = ParquetCache(cache_uri, fp) if cache_uri else None
        self._vecs, self._thumbs = ray.get(known[0]) if known else (frozenset(), frozenset())
        self._dim = dim
        self._decode: Callable[[bytes], npt.NDArray[np.uint8]] = decode_image
        self._s3: Any = None

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from cloud.cache import _pixels_key

        cols = batch.to_pydict()
        out: dict[str, list[Any]] = {k: [] for k in ("idx", "sha", "vec", "thumb", "embedded", "error")}
        new_vecs: dict[str, npt.NDArray[np.float32]] = {}
        new_thumbs: dict[str, bytes] = {}
        for idx, source, want_thumb in zip(cols["idx"], cols["source"], cols["thumb"], strict=True):
            sha, vec, thumb, embedded, error = self._one(source, bool(want_thumb), _pixels_key)
            if vec is not None and embedded:
                new_vecs[sha] = vec
            if thumb is not None:
                new_thumbs[sha] = thumb
            for k, v in zip(out, (idx, sha, None if vec is None else vec.astype("<f4").tobytes(), thumb,
                                  embedded, error), strict=True):  # fmt: skip
                out[k].append(v)
        if self._cache is not None:  # before the batch counts as done: a later kill loses nothing
            self._cache.write(new_vecs, new_thumbs)
        return pa.table({
            "idx": pa.array(out["idx"], pa.int64()), "sha": pa.array(out["sha"], pa.string()),
            "vec": pa.array(out["vec"], pa.binary()), "thumb": pa.array(out["thumb"], pa.binary()),
            "embedded": pa.array(out["embedded"], pa.bool_()), "error": pa.array(out["error"], pa.string()),
        })  # fmt: skip

    def _one(
        self, source: str, want_thumb: bool, key: Callable[[str], str]
    ) -> tuple[str, npt.NDArray[np.float32] | None, bytes | None, bool, str | None]:
        """(sha, new vector, new thumbnail, ran the model, error) for one photo."""
        try:
            data = fetch_image_bytes(source, self._base_dir, s3_client=self._s3_client(source))
        except FetchError as exc:
            return "", None, None, False, str(exc)
        sha = hashlib.sha256(data).hexdigest()
        has_vec = key(sha) in self._vecs
        need_thumb = want_thumb and key(sha) not in self._thumbs
        if has_vec and not need_thumb:
            return sha, None, None, False, None
        try:
            image = self._decode(data)
        except Exception as exc:  # decoder failures of any kind (BadImage, cv2.error) fail this row only
            return sha, None, None, False, f"{type(exc).__name__}: {exc}"
        thumb = None
        if need_thumb:
            try:
                thumb = make_thumbnail(image)
            except Exception as exc:  # cv2.error on an odd image: the item just has no thumbnail
                _LOGGER.warning("no thumbnail from %s: %s", source, exc)
        if has_vec:
            return sha, None, thumb, False, None
        try:
            vec = np.asarray(self._embedder.embed([image])[0], np.float32)
        except Exception as exc:  # one image's inference failing skips that image, not the build
            return sha, None, thumb, True, f"embedding failed: {type(exc).__name__}: {exc}"
        if vec.shape != (self._dim,):
            return sha, None, thumb, True, f"embedder returned shape {vec.shape}, expected ({self._dim},)"
        return sha, vec, thumb, True, None

    def _s3_client(self, source: str) -> Any:
        if self._s3 is None and source.startswith("s3://"):
            import boto3

            self._s3 = boto3.client("s3")  # one per actor, made on its first s3:// photo
        return self._s3


@dataclass(slots=True)
class EmbedOutcome:
    """Every (item, photo) job finished (vector, cache hit or error) plus what the summary counts."""

    jobs: list[_Job]
    reasons: dict[str, int]  # failure class -> photos


def make_jobs(items: list[Item]) -> list[_Job]:
    """One job per (item, photo), in catalog order; an item's first photo makes its thumbnail."""
    return [_Job(it, src, thumb_wanted=i == 0) for it in items for i, src in enumerate(it.images)]


def embed_jobs(
    jobs: list[_Job],
    factory: EmbedderFactory,
    space: EmbeddingSpace,
    *,
    base_dir: Path,
    cache_uri: str | None,
    actors: int,
    cpus_per_actor: float = 1.0,
    batch_size: int = BATCH,
    progress: bool = True,
) -> EmbedOutcome:
    """Run every job through the actor pool; cached vectors and thumbnails are read back here."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    cache = ParquetCache(cache_uri, fingerprint(space)) if cache_uri else None
    known = [ray.put(cache.known())] if cache is not None else []
    rows = [{"idx": i, "source": j.source, "thumb": j.thumb_wanted} for i, j in enumerate(jobs)]
    with warnings.catch_warnings():  # actor restarts have no named parameter yet (Ray 2.60): kwargs it is
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = _pipeline(ray.data.from_items(rows), factory, space, base_dir, cache_uri, known, actors,
                       cpus_per_actor, batch_size)  # fmt: skip
    for batch in _batches(ds):
        for idx, sha, vec, thumb, embedded, error in zip(*(batch.column(c).to_pylist() for c in (
                "idx", "sha", "vec", "thumb", "embedded", "error")), strict=True):  # fmt: skip
            j = jobs[idx]
            j.sha, j.embedded, j.error, j.thumb = sha, embedded, error, thumb
            j.vec = None if vec is None else np.frombuffer(vec, dtype="<f4").astype(np.float32)
    if cache is not None:
        _fill_from_cache(jobs, cache, space.dim)
    reasons: dict[str, int] = {}
    for j in jobs:
        if j.error is not None:
            reasons[_reason(j.error)] = reasons.get(_reason(j.error), 0) + 1
    return EmbedOutcome(jobs, reasons)


def _pipeline(
    ds: Any, factory: EmbedderFactory, space: EmbeddingSpace, base_dir: Path, cache_uri: str | None,
    known: list[Any], actors: int, cpus_per_actor: float, batch_size: int,
) -> Any:  # fmt: skip
    import ray.data

    return ds.map_batches(
        EmbedActor,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        fn_constructor_kwargs={
            "factory": factory,
            "base_dir": str(base_dir),
            "cache_uri": cache_uri,
            "fp": fingerprint(space),
            "dim": space.dim,
            "known": known,
        },
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
    )


def _batches(ds: Any) -> Iterator[Any]:
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _fill_from_cache(jobs: list[_Job], cache: ParquetCache, dim: int) -> None:
    hits = [j for j in jobs if j.error is None and j.vec is None]
    vecs = cache.vectors({j.sha for j in hits}, dim)
    thumbs = cache.thumbs({j.sha for j in jobs if j.thumb_wanted and j.error is None and j.thumb is None})
    for j in jobs:
        if j.error is None and j.thumb_wanted and j.thumb is None:
            j.thumb = thumbs.get(j.sha)
    for j in hits:
        j.vec = vecs.get(j.sha)
        if j.vec is None:  # listed when the job started, unreadable now (a shard removed meanwhile)
            j.error = "cached vector vanished from the shared cache during the build"
