"""What the collector checks before a feedback message is stored, each refusal with a named reason.

``verify`` runs the contract's ``parse_feedback`` (size, schema, topic ids vs payload, vector, crop
magic), then decodes the crop (a JPEG within ``MAX_CROP_SIDE_PX``; its header is read before any pixel
is, so a decompression bomb is refused unopened) and looks the model and snapshot version up among the
store's published snapshots (``KnownSnapshots``). ``TokenBuckets`` rate-limits one kiosk's flood.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path

from storelens.errors import ReasonError
from storelens.feedback import (
    FEEDBACK_SUFFIX,
    MAX_CROP_SIDE_PX,
    FeedbackEvent,
    parse_feedback,
)
from storelens.protocol import MAX_PAYLOAD_BYTES, ProtocolError, decode, parse_kiosk_topic
from storelens.snapshot import MANIFEST

_LOGGER = logging.getLogger(__name__)

MAX_MANIFEST_MEMBER_BYTES = 4 * 1024 * 1024  # a manifest lists every file's hash: small; more is not one
RESCAN_MIN_S = 5.0  # an unknown version re-reads the snapshots folder at most this often (a flood of
#                     forged versions must not turn into a flood of directory scans)


class Reason(StrEnum):
    """What became of one message (the counters of ``FeedbackCollector.stats``)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # a replay of a stored message (same store, kiosk, message id)
    RATE_LIMITED = "rate_limited"  # over its kiosk's token bucket: acknowledged, not stored
    OVERSIZED = "oversized"
    BAD_TOPIC = "bad_topic"
    MALFORMED = "malformed"  # not JSON, wrong fields, bad vector
    FORGED = "forged"  # the payload names another store/kiosk than its topic
    BAD_IMAGE = "bad_image"  # the crop is not a decodable JPEG within the size caps
    UNKNOWN_SNAPSHOT = "unknown_snapshot"  # model id / snapshot version never published for the store
    WRONG_STORE = "wrong_store"  # a topic of another store (a broad subscription)


class Refused(ReasonError[Reason]):
    """A message that is not stored, with its reason and a one-line detail."""


class KnownSnapshots:
    """The (model id, snapshot version) pairs a store's kiosks may answer with.

    Read from the folder ``catalog publish --to file://DIR`` writes (``DIR/{store}/v{N}/snapshot.tar``;
    only the manifest member of each archive is read), and/or a fixed set of model ids (any version).
    A message's model may be a prefix (8+ hex) of the published id.
    """

    def __init__(
        self,
        store: str,
        *,
        snapshots_dir: Path | None = None,
        model_ids: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._dir = None if snapshots_dir is None else Path(snapshots_dir)
        self._models = frozenset(model_ids)
        self._clock = clock
        self._lock = threading.Lock()
        self._pairs: dict[int, str] = {}  # version -> model id
        self._seen: dict[Path, tuple[int, int]] = {}  # archive -> (mtime_ns, size) already read
        self._scanned_at: float | None = None
        if self._dir is not None and not self._dir.is_dir():
            raise ValueError(f"snapshots folder {self._dir} does not exist")
        self.rescan()

    def versions(self) -> dict[int, str]:
        """The published versions read so far, with their model ids."""
        with self._lock:
            return dict(self._pairs)

    def rescan(self) -> None:
        """Read archives added to the snapshots folder since the last scan."""
        with self._lock:
            self._scanned_at = self._clock()
            if self._dir is None:
                return
            for archive in sorted((self._dir / self._store).glob("v*/snapshot.tar")):
                try:
                    st = archive.stat()
                    if self._seen.get(archive) == (st.st_mtime_ns, st.st_size):
                        continue
                    self._seen[archive] = (st.st_mtime_ns, st.st_size)
                    m = _manifest_of(archive)
                except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as exc:
                    _LOGGER.warning("snapshot archive %s not readable, skipped: %s", archive, exc)
                    continue
                if m is not None and m[0] == self._store:
                    self._pairs[m[1]] = m[2]

    def check(self, model: str, version: int) -> None:
        """Refused(UNKNOWN_SNAPSHOT) unless ``model`` is known (with ``version``, for published ones)."""
        if any(m.startswith(model) for m in self._models):
            return
        if self._match(model, version):
            return
        with self._lock:
            stale = self._scanned_at is None or self._clock() - self._scanned_at >= RESCAN_MIN_S
        if stale and self._dir is not None:
            self.rescan()
            if self._match(model, version):
                return
        raise Refused(Reason.UNKNOWN_SNAPSHOT, f"model {model[:12]} / snapshot v{version} of "
                                               f"{self._store} was never published")  # fmt: skip

    def _match(self, model: str, version: int) -> bool:
        with self._lock:
            known = self._pairs.get(version)
        return known is not None and known.startswith(model)


def _manifest_of(archive: Path) -> tuple[str, int, str] | None:
    """(store, version, model id) from the manifest member of a snapshot archive."""
    with tarfile.open(archive, "r:") as tar:  # uncompressed: headers are read, data skipped
        for member in tar:
            if member.name.lstrip("./") != MANIFEST:
                continue
            if not member.isfile() or member.size > MAX_MANIFEST_MEMBER_BYTES:
                return None
            f = tar.extractfile(member)
            if f is None:
                return None
            raw = json.loads(f.read().decode("utf-8"))  # our own published output: read, not verified
            if not isinstance(raw, dict):
                raise ValueError("manifest is not a JSON object")
            return str(raw["store"]), int(raw["version"]), str(raw["model_id"])
    return None


def check_crop(jpeg: bytes) -> tuple[int, int]:
    """The crop's (width, height) once it decodes fully as a JPEG within the caps; Refused otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(jpeg), formats=("JPEG",)) as img:
            w, h = img.size  # from the header: nothing decoded yet
            if max(w, h) > MAX_CROP_SIDE_PX:
                raise Refused(Reason.BAD_IMAGE, f"crop is {w}x{h} px, over {MAX_CROP_SIDE_PX} px a side")
            img.load()
    except Refused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Refused(Reason.BAD_IMAGE, f"crop does not decode as a JPEG: {exc}") from exc
    return w, h


def verify(topic: str, payload: bytes, *, store: str, known: KnownSnapshots) -> FeedbackEvent:
    """The checked message, or Refused naming why it is not stored."""
    try:
        msg = parse_feedback(topic, payload)
    except ProtocolError as exc:
        raise _classify(topic, payload, store, exc) from exc
    if msg.store != store:
        raise Refused(Reason.WRONG_STORE, f"topic of store {msg.store}, collecting {store}")
    check_crop(msg.crop_bytes())
    known.check(msg.model, msg.snapshot)
    return msg


def _classify(topic: str, payload: bytes, store: str, exc: ProtocolError) -> Refused:
    """Name the step of ``parse_feedback`` that failed (run again on the failure path only)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Refused(Reason.OVERSIZED, f"{len(payload)} bytes, over {MAX_PAYLOAD_BYTES}")
    try:
        t_store, t_kiosk, rest = parse_kiosk_topic(topic)
    except ProtocolError:
        return Refused(Reason.BAD_TOPIC, str(exc))
    if rest != FEEDBACK_SUFFIX:
        return Refused(Reason.BAD_TOPIC, str(exc))
    if t_store != store:
        return Refused(Reason.WRONG_STORE, f"topic of store {t_store}, collecting {store}")
    try:
        msg = decode(payload, FeedbackEvent)
    except ProtocolError:
        return Refused(Reason.MALFORMED, str(exc))
    if (msg.store, msg.kiosk) != (t_store, t_kiosk):
        return Refused(Reason.FORGED, str(exc))
    try:
        msg.crop_bytes()
    except ProtocolError:
        return Refused(Reason.BAD_IMAGE, str(exc))
    return Refused(Reason.MALFORMED, str(exc))


class TokenBuckets:
    """One token bucket per kiosk: ``burst`` messages at once, refilled at ``per_hour``."""

    MAX_KIOSKS = 10_000  # a bucket per topic id ever seen: full buckets are forgotten past this

    def __init__(self, *, per_hour: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_hour <= 0 or burst < 1:
            raise ValueError(f"rate limit needs per_hour > 0 and burst >= 1, got {per_hour}, {burst}")
        self._rate_per_s = per_hour / 3600.0
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # kiosk -> (tokens, at)

    def take(self, kiosk: str) -> bool:
        """Spend one token of ``kiosk``'s bucket; False when it is empty (over the limit)."""
        now = self._clock()
        tokens, at = self._buckets.get(kiosk, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate_per_s)
        ok = tokens >= 1.0
        self._buckets[kiosk] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.MAX_KIOSKS:
            self._forget_full(now)
        return ok

    def _forget_full(self, now: float) -> None:
        for k, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self._rate_per_s >= self._burst:
                del self._buckets[k]
