"""Catalog images -> embeddings: decoded once, ahead of inference, thumbnailed from the same pixels; cached.

A decode thread fetches, hashes, looks up the cache, decodes (safely: ``models.images.decode_image`` caps
size, format and pixels) and makes each item's thumbnail from its first photo's decoded pixels; it hands
decoded photos in chunks over a short bounded queue to one embed thread per infer request, which call
``embed_one`` (the Embedder resizes on the calling thread, then runs one of its requests). Memory stays
at a few decoded photos whatever the catalog size, and an inference error is reported against its
image. The cache (``cloud.cache``) is keyed by (image sha256, model fingerprint): a rebuild after a small
catalog change embeds only the images that changed. A bad image is reported with its item and source,
never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.cache import EmbeddingCache
from cloud.catalog import FetchError, Item, fetch_image_bytes
from models.port import EmbedderPort

_LOGGER = logging.getLogger(__name__)

THUMB_PX = 160  # longest side of a kiosk-screen thumbnail; ~5-10 KB as JPEG
THUMB_QUALITY = 80
DECODE_WORKERS = 2  # query decoding (cloud.research.evaluate): ~0.5 ms (348 px) to ~6 ms (1080p) per photo
DECODE_THREADS = 1  # a catalog build's own decoder (see _Pipeline for why one)
CHUNK = 8  # decoded photos handed over at once: one thread wake-up per chunk, not per photo
CHUNK_PIXELS = 4_000_000  # ... or fewer when they are large (a chunk of 12 MP photos is one photo)
# Chunks waiting for an embed thread. Decoded photos held at most: (decoders + QUEUE_DEPTH + embed
# threads) chunks = 32 small photos or 4 large ones.
QUEUE_DEPTH = 1


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
    thumb_wanted: bool  # the item's first image: its thumbnail is made from these pixels
    sha: str = ""
    image: npt.NDArray[np.uint8] | None = None  # decoded, waiting for inference
    vec: npt.NDArray[np.float32] | None = None
    thumb: bytes | None = None
    embedded: bool = False  # the model ran on this image (not a cache hit)
    error: str | None = None


def model_fingerprint(embedder: EmbedderPort) -> str:
    """Cache key part naming the embedding space: model weights plus preprocessing."""
    return f"{embedder.model_id}:{preprocessing_hash(embedder)}"


def preprocessing_hash(embedder: EmbedderPort) -> str:
    """The bundle's preprocessing hash; fakes without one answer 'none'."""
    return str(getattr(embedder, "preprocessing_hash", "none"))


def make_thumbnail(image: npt.NDArray[np.uint8], px: int = THUMB_PX) -> bytes:
    """A small JPEG of a BGR image, longest side ``px``."""
    import cv2

    h, w = image.shape[:2]
    small: Any = image
    factor = max(h, w) // px
    if factor >= 2:
        # An exact integer INTER_AREA step is OpenCV's box-filter fast path; the last < 2x step is bilinear.
        # 0.17 ms for a 348 px photo vs 0.51 ms for one fractional INTER_AREA resize (1.3 grey levels apart).
        h, w = max(factor, h - h % factor), max(factor, w - w % factor)
        small = cv2.resize(image[:h, :w], (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        h, w = small.shape[:2]
    scale = px / max(h, w)
    if scale < 1:
        small = cv2.resize(
            small, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR
        )
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:
        raise ValueError("JPEG encode failed")
    return bytes(buf.tobytes())


def _default_decoder() -> Callable[[bytes], npt.NDArray[np.uint8]]:
    from models.images import decode_image

    return decode_image


@dataclass(frozen=True, slots=True)
class _Context:
    base_dir: Path
    cache: EmbeddingCache | None
    fp: str
    dim: int
    decode: Callable[[bytes], npt.NDArray[np.uint8]]
    s3_client: Any
    downloader: Any  # cloud.feeds.download.Downloader for http(s) photos, or None


def _prepare(job: _Job, ctx: _Context) -> _Job:
    """Fetch, hash, look up the cache; decode only when needed and thumbnail (runs on a decode worker)."""
    try:
        data = fetch_image_bytes(job.source, ctx.base_dir, s3_client=ctx.s3_client, downloader=ctx.downloader)
    except FetchError as exc:
        job.error = str(exc)
        return job
    job.sha = hashlib.sha256(data).hexdigest()
    if ctx.cache is not None:
        job.vec = ctx.cache.get(job.sha, ctx.fp, ctx.dim)
        job.thumb = ctx.cache.get_thumb(job.sha) if job.thumb_wanted else None
        if job.vec is not None and (job.thumb is not None or not job.thumb_wanted):
            return job
    try:
        image = ctx.decode(data)
    except Exception as exc:  # decoder failures of any kind (BadImage, cv2.error) skip this one image
        job.error = f"{type(exc).__name__}: {exc}"
        job.vec = None
        return job
    if job.thumb_wanted and job.thumb is None:
        _thumbnail(job, image, ctx.cache)
    if job.vec is None:  # else only the thumbnail was missing
        job.image = image
    return job


def _thumbnail(job: _Job, image: npt.NDArray[np.uint8], cache: EmbeddingCache | None) -> None:
    try:
        job.thumb = make_thumbnail(image)
    except Exception as exc:  # cv2.error on an odd image: the item just has no thumbnail
        _LOGGER.warning("no thumbnail from %s of sku %s: %s", job.source, job.item.sku, exc)
        return
    if cache is not None:
        cache.put_thumb(job.sha, job.thumb)


class _Pipeline:
    """Decode thread -> bounded queue -> embed threads; each job ends with a vector, an error or a cache hit.

    Inference keeps both cores busy, so decode only competes with it: one dedicated decode thread (a
    second one measured no faster with 2 streams, and slower with one 2-thread stream, whose ops all
    wait for a preempted thread: 0.80 vs 0.86 of pure inference). When the queue runs dry (large photos
    decode slower than inference) an idle embed thread decodes the next photo itself. Decoded photos
    are handed over in chunks: one queue hand-off, so one thread wake-up, per chunk.
    """

    def __init__(self, embedder: EmbedderPort, ctx: _Context, on_done: Callable[[], None]) -> None:
        self._ctx = ctx
        self._on_done = on_done
        one = getattr(embedder, "embed_one", None)  # thread-safe when present (the Embedder's is)
        self._embed: Callable[[npt.NDArray[np.uint8]], Any] = (
            one if callable(one) else lambda image: embedder.embed([image])[0]
        )
        # One thread per infer request (the Embedder's throughput mode: two per OpenVINO stream); a plain
        # EmbedderPort need not be thread-safe: one thread. A third thread to resize while both requests
        # infer measured the same (0.78-0.82 vs 0.79-0.84 of embed() on pre-sized crops).
        self._n_embed = max(1, int(getattr(embedder, "num_requests", 1))) if callable(one) else 1
        self._todo: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._decoded: queue.Queue[list[_Job] | None] = queue.Queue(QUEUE_DEPTH)

    def run(self, jobs: list[_Job]) -> None:
        """Process every job; returns when all are finished."""
        for job in jobs:
            self._todo.put(job)
        decoders = [
            threading.Thread(target=self._decode_loop, name=f"catalog-decode-{i}")
            for i in range(DECODE_THREADS)
        ]
        embedders = [
            threading.Thread(target=self._embed_loop, name=f"catalog-embed-{i}") for i in range(self._n_embed)
        ]
        for t in embedders + decoders:
            t.start()
        try:
            for t in decoders:
                t.join()
        finally:
            for _ in embedders:  # after the last decoded job: the embed threads finish the queue, then stop
                self._decoded.put(None)
            for t in embedders:
                t.join()

    def _next(self) -> _Job | None:
        try:
            return self._todo.get_nowait()
        except queue.Empty:
            return None

    def _prepare(self, job: _Job) -> bool:
        """Prepare one job; True when it needs the model (else it is finished)."""
        _prepare(job, self._ctx)
        if job.image is None:
            self._on_done()
            return False
        job.embedded = True
        return True

    def _decode_loop(self) -> None:
        ready: list[_Job] = []
        pixels = 0
        while (job := self._next()) is not None:
            if self._prepare(job) and job.image is not None:
                ready.append(job)
                pixels += job.image.shape[0] * job.image.shape[1]
            if len(ready) >= CHUNK or pixels >= CHUNK_PIXELS:
                self._decoded.put(ready)
                ready, pixels = [], 0
        if ready:
            self._decoded.put(ready)

    def _embed_loop(self) -> None:
        while True:
            try:
                chunk = self._decoded.get_nowait()
            except queue.Empty:
                job = self._next()  # nothing decoded: inference waits anyway, so decode one here
                if job is not None:
                    chunk = [job] if self._prepare(job) else []
                else:
                    chunk = self._decoded.get()
            if chunk is None:
                return
            for job in chunk:
                self._embed_job(job)
                self._on_done()

    def _embed_job(self, job: _Job) -> None:
        image, job.image = job.image, None
        if image is None:
            job.error = "not decoded"
            return
        try:
            vec = np.asarray(self._embed(image), np.float32)
        except Exception as exc:  # one image's inference failing skips that image, not the build
            job.error = f"embedding failed: {type(exc).__name__}: {exc}"
            return
        if vec.shape != (self._ctx.dim,):
            job.error = f"embedder returned shape {vec.shape}, expected ({self._ctx.dim},)"
            return
        job.vec = vec
        if self._ctx.cache is not None:
            self._ctx.cache.put(job.sha, self._ctx.fp, vec)


def featurize(
    items: list[Item],
    embedder: EmbedderPort,
    *,
    base_dir: Path,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    decode: Callable[[bytes], npt.NDArray[np.uint8]] | None = None,
    s3_client: Any = None,
    downloader: Any = None,
) -> Features:
    """Embed every image of ``items`` (decode overlapping inference); skip and report bad images."""
    from tqdm import tqdm

    ctx = _Context(
        base_dir=base_dir,
        cache=cache,
        fp=model_fingerprint(embedder),
        dim=int(embedder.dim),
        decode=decode or _default_decoder(),
        s3_client=s3_client,
        downloader=downloader,
    )
    jobs = [_Job(it, src, thumb_wanted=i == 0) for it in items for i, src in enumerate(it.images)]
    feats = Features(dim=ctx.dim, vectors=np.zeros((0, ctx.dim), np.float32), rows=[], thumbs={})
    # tqdm starts a monitor thread per process on first use: only create a bar when one is shown.
    bar: Any = tqdm(total=len(jobs), desc="embedding", unit="img") if progress else None
    bar_lock = threading.Lock()

    def on_done() -> None:
        if bar is not None:
            with bar_lock:
                bar.update(1)

    try:
        _Pipeline(embedder, ctx, on_done).run(jobs)
    finally:
        if bar is not None:
            bar.close()
    feats.embedded = sum(j.embedded for j in jobs)
    feats.cache_hits = sum(j.error is None and not j.embedded for j in jobs)
    _thumbs_after_bad_first(jobs, ctx)
    if cache is not None:
        cache.commit()
    _collect(jobs, feats)
    return feats


def _thumbs_after_bad_first(jobs: list[_Job], ctx: _Context) -> None:
    """Items whose first image failed get their thumbnail from their first good one (decoded again)."""
    missing = {j.item.sku for j in jobs if j.thumb_wanted and j.thumb is None}
    for job in jobs:
        if job.item.sku not in missing or job.error is not None or job.vec is None:
            continue
        missing.discard(job.item.sku)
        job.thumb = ctx.cache.get_thumb(job.sha) if ctx.cache is not None else None
        if job.thumb is not None:
            continue
        try:
            data = fetch_image_bytes(
                job.source, ctx.base_dir, s3_client=ctx.s3_client, downloader=ctx.downloader
            )
            image = ctx.decode(data)
        except Exception as exc:  # it decoded a moment ago; a changed file costs the thumbnail only
            _LOGGER.warning("no thumbnail for sku %s from %s: %s", job.item.sku, job.source, exc)
            continue
        _thumbnail(job, image, ctx.cache)


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
