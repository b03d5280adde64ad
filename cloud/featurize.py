"""Catalog images -> embeddings: fetch and decode on a thread pool overlapping inference, with a cache.

The cache is SQLite keyed by (image sha256, model fingerprint), so a rebuild after a small catalog change
embeds only the images that changed. Every untrusted image goes through ``models.images.decode_image``
(size, format and pixel caps); a bad image is reported with its item and source, never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cloud.catalog import FetchError, Item, fetch_image_bytes

_LOGGER = logging.getLogger(__name__)

THUMB_PX = 160  # longest side of a kiosk-screen thumbnail; ~5-10 KB as JPEG
THUMB_QUALITY = 80
BATCH = 16  # images per embed() call: enough to keep a throughput-mode queue busy, small in memory
DECODE_WORKERS = 2  # decode is ~5 ms per photo on one core; two keep up with a 2-core inference budget


class EmbedderLike(Protocol):
    """The part of models.embedder.Embedder a catalog build needs (``submit``/``wait`` used if present)."""

    @property
    def dim(self) -> int: ...
    @property
    def model_id(self) -> str: ...
    def embed(self, crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]: ...


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
            row = self._db.execute("SELECT vec FROM emb WHERE sha=? AND model=?", (sha, model)).fetchone()
        if row is None or len(row[0]) != 4 * dim:
            return None
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def put(self, sha: str, model: str, vec: npt.NDArray[np.float32]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO emb VALUES (?, ?, ?)", (sha, model, vec.astype("<f4").tobytes())
            )

    def get_thumb(self, sha: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT jpeg FROM thumb WHERE sha=?", (sha,)).fetchone()
        return bytes(row[0]) if row else None

    def put_thumb(self, sha: str, jpeg: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO thumb VALUES (?, ?)", (sha, jpeg))

    def commit(self) -> None:
        with self._lock:
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.commit()
            self._db.close()


@dataclass(frozen=True, slots=True)
class VectorRow:
    sku: str
    image_sha256: str
    source: str


@dataclass(slots=True)
class Features:
    """What featurization produced: one vector per good (item, image), thumbnails and the failures."""

    dim: int
    vectors: npt.NDArray[np.float32]
    rows: list[VectorRow]
    thumbs: dict[str, bytes]  # sku -> JPEG of its first good image
    bad_images: list[dict[str, Any]] = field(default_factory=list)
    embedded: int = 0  # images run through the model this time
    cache_hits: int = 0


@dataclass(slots=True)
class _Job:
    item: Item
    source: str
    sha: str = ""
    image: npt.NDArray[np.uint8] | None = None
    vec: npt.NDArray[np.float32] | None = None
    thumb: bytes | None = None
    error: str | None = None


def model_fingerprint(embedder: EmbedderLike) -> str:
    """Cache key part naming the embedding space: model weights plus preprocessing."""
    return f"{embedder.model_id}:{preprocessing_hash(embedder)}"


def preprocessing_hash(embedder: EmbedderLike) -> str:
    """The bundle's preprocessing hash; fakes without one answer 'none'."""
    return str(getattr(embedder, "preprocessing_hash", "none"))


def make_thumbnail(image: npt.NDArray[np.uint8], px: int = THUMB_PX) -> bytes:
    """A small JPEG of a BGR image, longest side ``px``."""
    import cv2

    h, w = image.shape[:2]
    scale = px / max(h, w)
    small: Any = image
    if scale < 1:
        small = cv2.resize(
            image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:
        raise ValueError("JPEG encode failed")
    return bytes(buf.tobytes())


def _default_decoder() -> Callable[[bytes], npt.NDArray[np.uint8]]:
    from models.images import decode_image

    return decode_image


def _prepare(
    job: _Job,
    *,
    base_dir: Path,
    cache: EmbeddingCache | None,
    fp: str,
    dim: int,
    first: set[int],
    decode: Callable[[bytes], npt.NDArray[np.uint8]],
    s3_client: Any,
) -> _Job:
    """Fetch, hash, look up the cache, and decode only when needed (runs on the pool)."""
    need_thumb = id(job) in first
    try:
        data = fetch_image_bytes(job.source, base_dir, s3_client=s3_client)
    except FetchError as exc:
        job.error = str(exc)
        return job
    job.sha = hashlib.sha256(data).hexdigest()
    if cache is not None:
        job.vec = cache.get(job.sha, fp, dim)
        job.thumb = cache.get_thumb(job.sha) if need_thumb else None
        if job.vec is not None and (job.thumb is not None or not need_thumb):
            return job
    try:
        job.image = decode(data)
    except Exception as exc:  # decoder failures of any kind (BadImage, cv2.error) skip this one image
        job.error = f"{type(exc).__name__}: {exc}"
        job.vec = None
        return job
    if need_thumb and job.thumb is None:
        job.thumb = make_thumbnail(job.image)
        if cache is not None:
            cache.put_thumb(job.sha, job.thumb)
    if job.vec is not None:
        job.image = None  # only the thumbnail was missing
    return job


def featurize(
    items: list[Item],
    embedder: EmbedderLike,
    *,
    base_dir: Path,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    decode: Callable[[bytes], npt.NDArray[np.uint8]] | None = None,
    s3_client: Any = None,
    batch: int = BATCH,
) -> Features:
    """Embed every image of ``items`` (decode overlapping inference); skip and report bad images."""
    from tqdm import tqdm

    decode = decode or _default_decoder()
    fp, dim = model_fingerprint(embedder), int(embedder.dim)
    jobs = [_Job(it, src) for it in items for src in it.images]
    first = {id(j) for j in (next(jj for jj in jobs if jj.item is it) for it in items)}
    feats = Features(dim=dim, vectors=np.zeros((0, dim), np.float32), rows=[], thumbs={})
    done: list[_Job] = []
    pending: list[_Job] = []
    # tqdm starts a monitor thread per process on first use: only create a bar when one is shown.
    bar: Any = tqdm(total=len(jobs), desc="embedding", unit="img") if progress else _NullBar()

    submit = getattr(embedder, "submit", None)
    embedded: list[_Job] = []

    def on_embedded(vec: npt.NDArray[np.float32], job: object) -> None:
        assert isinstance(job, _Job)
        job.vec = np.asarray(vec, np.float32)
        bar.update(1)

    def flush() -> None:
        # Fakes embed in batches; the real Embedder takes one crop at a time into its async queue
        # (submit copies the crop), so inference never drains between batches.
        if not pending:
            return
        if submit is not None:
            for j in pending:
                submit(j.image, on_embedded, j)
                j.image = None
        else:
            out = np.asarray(embedder.embed([j.image for j in pending if j.image is not None]), np.float32)
            if out.shape != (len(pending), dim):
                raise ValueError(f"embedder returned {out.shape}, expected {(len(pending), dim)}")
            for j, v in zip(pending, out, strict=True):
                j.vec, j.image = v, None
            bar.update(len(pending))
        embedded.extend(pending)
        pending.clear()

    limit = 4 * batch
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="catalog-decode") as pool:
        prepare = partial(
            _prepare,
            base_dir=base_dir,
            cache=cache,
            fp=fp,
            dim=dim,
            first=first,
            decode=decode,
            s3_client=s3_client,
        )
        for job in _bounded(pool, jobs, prepare, limit=limit):
            done.append(job)
            if job.error is None and job.vec is None:
                pending.append(job)
                if len(pending) >= (1 if submit is not None else batch):
                    flush()
            else:
                feats.cache_hits += job.vec is not None
                bar.update(1)
        flush()
    if submit is not None:
        embedder.wait()  # type: ignore[attr-defined]
    bar.close()
    for j in embedded:
        if j.vec is None or j.vec.shape != (dim,):
            j.error = "embedder returned no vector"
        elif cache is not None:
            cache.put(j.sha, fp, j.vec)
    feats.embedded = len(embedded)
    if cache is not None:
        cache.commit()
    _collect(done, feats)
    return feats


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bounded(
    pool: ThreadPoolExecutor, jobs: list[_Job], fn: Callable[[_Job], _Job], *, limit: int
) -> Iterator[_Job]:
    """Map ``fn`` over ``jobs`` in order with at most ``limit`` in flight (memory stays flat)."""
    it = iter(jobs)
    window: deque[Future[_Job]] = deque()
    for job in it:
        window.append(pool.submit(fn, job))
        if len(window) >= limit:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _collect(done: list[_Job], feats: Features) -> None:
    seen: set[tuple[str, str]] = set()
    vecs: list[npt.NDArray[np.float32]] = []
    for j in done:
        if j.error is not None or j.vec is None:
            feats.bad_images.append(
                {"row": j.item.row, "sku": j.item.sku, "source": j.source, "error": j.error or "not embedded"}
            )
            _LOGGER.warning("skipped image %s of sku %s: %s", j.source, j.item.sku, j.error)
            continue
        if (j.item.sku, j.sha) in seen:  # the same picture listed twice for one item
            continue
        seen.add((j.item.sku, j.sha))
        v = j.vec / max(float(np.linalg.norm(j.vec)), 1e-12)
        vecs.append(v.astype(np.float32))
        feats.rows.append(VectorRow(j.item.sku, j.sha, j.source))
        if j.item.sku not in feats.thumbs and j.thumb is not None:
            feats.thumbs[j.item.sku] = j.thumb
    if vecs:
        feats.vectors = np.stack(vecs).astype(np.float32)
