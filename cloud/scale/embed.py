"""Catalog photos -> embeddings on Ray Data: ``map_batches`` over an actor pool, one compiled model each.

Each actor fetches its batch's photos (local path, ``file://``, ``s3://``, http(s) through a
``cloud.feeds.download.Downloader`` of its own: the single path's retries with backoff, and its
content-addressed cache when the build has a local cache directory), hashes them, skips those the
shared Parquet cache already has (the driver sends the cached keys once), decodes the rest safely,
thumbnails first photos, embeds, and writes the new vectors and thumbnails as one new cache shard
before returning the batch: a worker killed later loses nothing finished, and a job that dies resumes
from the cache. A bad photo fails its row with a reason; only a bug or a dead machine fails a batch
(retried on a restarted actor, ``MAX_RESTARTS`` times).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from cloud.catalog import FetchError, Item, fetch_image_bytes
from cloud.featurize import _Job, make_thumbnail
from cloud.feeds.download import Downloader
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
        self, factory: EmbedderFactory, base_dir: str, cache_uri: str | None, fp: str, dim: int, known: Any,
        download_dir: str | None = None,
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
        # http(s) photos: retried on network errors, 429 and 5xx (a CDN's hiccup must not drop a product's
        # photo from the build), a dead link remembered; cached under ``download_dir`` when given (a
        # rebuild downloads nothing: the Parquet cache is keyed by the photo's bytes, so without it every
        # rebuild fetches every photo again). One request at a time per actor: ``actors`` against a host.
        self._downloader = Downloader(Path(download_dir) if download_dir else None)
        # An Embedder queues photos (``submit``, then ``wait`` once a batch); a plain EmbedderPort embeds
        # each in turn.
        submit, wait = getattr(self._embedder, "submit", None), getattr(self._embedder, "wait", None)
        self._submit: Any = submit if callable(submit) and callable(wait) else None
        self._wait: Any = wait

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from cloud.cache import _pixels_key

        cols = batch.to_pydict()
        rows: list[_Row] = []
        for source, want in zip(cols["source"], cols["thumb"], strict=True):
            rows.append(row := self._prepare(source, bool(want), _pixels_key))
            if row.image is not None:  # one decoded photo held at a time: 12 MP photos are 36 MB each
                self._infer(row)
        if self._submit is not None:
            self._wait()
        if self._cache is not None:  # before the batch counts as done: a later kill loses nothing
            self._cache.write({r.sha: r.vec for r in rows if r.vec is not None},
                              {r.sha: r.thumb for r in rows if r.thumb is not None})  # fmt: skip
        return pa.table({
            "idx": pa.array(cols["idx"], pa.int64()),
            "sha": pa.array([r.sha for r in rows], pa.string()),
            "vec": pa.array([None if r.vec is None else r.vec.astype("<f4").tobytes() for r in rows],
                            pa.binary()),
            "thumb": pa.array([r.thumb for r in rows], pa.binary()),
            "embedded": pa.array([r.embedded for r in rows], pa.bool_()),
            "error": pa.array([r.error for r in rows], pa.string()),
        })  # fmt: skip

    def _prepare(self, source: str, want_thumb: bool, key: Callable[[str], str]) -> _Row:
        """Fetch, hash, skip what the cache has, decode, thumbnail; ``image`` set when the model must run."""
        row = _Row()
        try:
            data = fetch_image_bytes(source, self._base_dir, s3_client=self._s3_client(source),
                                     downloader=self._downloader)
        except FetchError as exc:
            row.error = str(exc)
            return row
        row.sha = hashlib.sha256(data).hexdigest()
        has_vec = key(row.sha) in self._vecs
        need_thumb = want_thumb and key(row.sha) not in self._thumbs
        if has_vec and not need_thumb:
            return row
        try:
            image = self._decode(data)
        except Exception as exc:  # decoder failures of any kind (BadImage, cv2.error) fail this row only
            row.error = f"{type(exc).__name__}: {exc}"
            return row
        if need_thumb:
            try:
                row.thumb = make_thumbnail(image)
            except Exception as exc:  # cv2.error on an odd image: the item just has no thumbnail
                _LOGGER.warning("no thumbnail from %s: %s", source, exc)
        if not has_vec:
            row.image = image
        return row

    def _infer(self, row: _Row) -> None:
        """Embed ``row``'s photo. With an Embedder's ``submit`` it is resized here and queued, and the next
        photo decodes while it infers; every request of a multi-stream actor stays busy (one
        ``embed([image])`` at a time used one stream: 1 actor x 2 CPUs at a third of the single path)."""
        try:
            if self._submit is not None:
                self._submit(row.take(), _Row.on_vector, (row, self._dim))
            else:
                row.done(np.asarray(self._embedder.embed([row.take()])[0], np.float32), self._dim)
        except Exception as exc:  # one image's inference failing skips that image, not the build
            row.failed(exc)

    def _s3_client(self, source: str) -> Any:
        if self._s3 is None and source.startswith("s3://"):
            import boto3

            self._s3 = boto3.client("s3")  # one per actor, made on its first s3:// photo
        return self._s3


@dataclass(slots=True)
class _Row:
    """One photo of a batch inside an actor: what the actor returns for it."""

    sha: str = ""
    image: npt.NDArray[np.uint8] | None = None  # decoded, waiting for the model
    vec: npt.NDArray[np.float32] | None = None  # a NEW vector (cache hits are read back by the driver)
    thumb: bytes | None = None  # a NEW thumbnail
    embedded: bool = False  # the model ran on it
    error: str | None = None

    def take(self) -> npt.NDArray[np.uint8]:
        image, self.image = self.image, None
        assert image is not None
        self.embedded = True
        return image

    def done(self, vec: npt.NDArray[np.float32], dim: int) -> None:
        if vec.shape != (dim,):
            self.error = f"embedder returned shape {vec.shape}, expected ({dim},)"
        else:
            self.vec = vec

    def failed(self, exc: BaseException) -> None:
        self.error = f"embedding failed: {type(exc).__name__}: {exc}"

    @staticmethod
    def on_vector(vec: npt.NDArray[np.float32] | None, userdata: object) -> None:
        """The Embedder's ``submit`` callback (an embedder thread; None: that inference failed, logged)."""
        row, dim = cast("tuple[_Row, int]", userdata)
        if vec is None:
            row.error = "embedding failed: see the actor's log"
        else:
            row.done(np.asarray(vec, np.float32), dim)


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
    download_dir: Path | None = None,
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
                       cpus_per_actor, batch_size, download_dir)  # fmt: skip
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
    known: list[Any], actors: int, cpus_per_actor: float, batch_size: int, download_dir: Path | None,
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
            "download_dir": str(download_dir) if download_dir is not None else None,
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
