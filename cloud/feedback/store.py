"""The feedback store: accepted kiosk feedback, content-addressed and de-duplicated, plus staff decisions.

Layout under one root folder (one store's or many stores' feedback):

    records/{record_id}.json   the message minus its crop (vector kept), plus ``crop_sha256``, ``received``
    crops/{sha256}.jpg         the held item's crop, content-addressed (identical crops stored once)
    decisions.jsonl            append-only: one staff (or auto-rule) decision per line; the last line
                               for a record wins, so every decision is reversible and keeps who/when

``record_id`` is derived from (store, kiosk, message id): a replayed message is the same record. Every
write is atomic and fsynced before ``put`` returns, so a collector may acknowledge the message after it.

The same layout lives under an S3 prefix (``s3://bucket/prefix``, ``open_feedback_store``), except that
S3 cannot append: each decision is its own object, ``decisions/{time_ns}-{random}.json``, read in key
order (so the writers' clocks order decisions made on different machines). S3 acknowledges a PUT once the
object is stored, which is the durability the collector waits for. Records, decisions and crops never
change once written, so reads are cached: records and decisions in memory, crops as files in a local
cache folder (checked against the sha256 in their name) that the dashboard and the catalog build read.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cloud.feedback.store_backends import Backend, Folder, S3Prefix, default_cache_dir
from cloud.feedback.store_backends import CorruptCrop as CorruptCrop  # re-exported: callers import it here
from cloud.feedback.store_backends import FeedbackStoreError as FeedbackStoreError
from storelens.feedback import FeedbackEvent, decode_vector
from storelens.snapshot import utc_now_iso

Decision = Literal["approved", "rejected", "reassigned", "not_carried", "pending"]
Status = Literal["pending", "approved", "rejected", "not_carried", "unlabelled"]


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    record_id: str
    decision: Decision
    sku: str | None  # the product the photo shows after this decision (approved / reassigned)
    who: str  # a staff login, or "auto:<rule>"
    ts: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One accepted message and where review left it."""

    record_id: str
    store: str
    kiosk: str
    ts: str
    received: str
    answer: str
    chosen_sku: str | None
    shown: tuple[str, ...]
    top_score: float | None
    model: str
    snapshot: int
    crop_sha256: str
    status: Status
    label_sku: str | None  # the product this photo is a store photo of, once approved/reassigned
    decided_by: str | None
    decided_ts: str | None


def record_id_of(store: str, kiosk: str, message_id: str) -> str:
    """The de-duplication key of a message: its ids, not its bytes (a replay is the same record)."""
    return hashlib.sha256(f"{store}\0{kiosk}\0{message_id}".encode()).hexdigest()[:32]


def open_feedback_store(
    location: FeedbackSource, *, create: bool = False, cache_dir: Path | None = None, s3_client: Any = None
) -> FeedbackStore:
    """A feedback store at a folder or ``s3://bucket/prefix`` (one already open is returned as it is: a
    caller that reads it several times passes it on). A missing folder is created only with ``create``
    (the collector), else FeedbackStoreError, as is an S3 bucket that cannot be reached."""
    if isinstance(location, FeedbackStore):
        return location
    text = str(location)
    if text.startswith("s3://"):
        parts = urllib.parse.urlsplit(text)
        if not parts.netloc:
            raise FeedbackStoreError(f"no bucket in {text!r}")
        loc = text.rstrip("/")
        return FeedbackStore(
            backend=S3Prefix(parts.netloc, parts.path, cache_dir or default_cache_dir(loc), s3_client)
        )
    if "://" in text:
        raise FeedbackStoreError(f"{text!r}: a feedback store is a folder or s3://bucket/prefix")
    root = Path(text)
    if not create and not root.is_dir():
        raise FeedbackStoreError(f"feedback folder {root} does not exist")
    return FeedbackStore(root)


class FeedbackStore:
    """Feedback records and decisions in a local folder (created if missing) or, through
    ``open_feedback_store``, under an S3 prefix (see the module doc for the layout)."""

    def __init__(self, root: Path | None = None, *, backend: Backend | None = None) -> None:
        if backend is None:
            if root is None:
                raise ValueError("FeedbackStore needs a folder or a backend")
            backend = Folder(Path(root))
        self._b = backend
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        """The folder or ``s3://`` location (for messages)."""
        return self._b.where

    @property
    def root(self) -> Path:
        """The local folder of a folder store (TypeError for an S3 one)."""
        if not isinstance(self._b, Folder):
            raise TypeError(f"{self._b.where} is not a local folder")
        return self._b.root

    # ---- writing ----

    def put(self, msg: FeedbackEvent) -> tuple[str, bool]:
        """Store one verified message durably; returns (record_id, False when it was already stored)."""
        rid = record_id_of(msg.store, msg.kiosk, msg.id)
        key = f"records/{rid}.json"
        with self._lock:
            if self._b.exists(key):
                return rid, False
            crop = msg.crop_bytes()
            crop_sha = hashlib.sha256(crop).hexdigest()
            crop_key = f"crops/{crop_sha}.jpg"
            if not self._b.exists(crop_key):  # the crop first: a record never names a missing crop
                self._b.write(crop_key, crop)
            body = msg.model_dump(mode="json", exclude={"crop_jpeg"})
            body.update(record_id=rid, crop_sha256=crop_sha, received=utc_now_iso())
            self._b.write(key, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
        return rid, True

    def decide(
        self, record_id: str, decision: Decision, *, who: str, sku: str | None = None, note: str = ""
    ) -> DecisionEntry:
        """Append a decision (approved/reassigned need the product's sku, taken from the record for
        approved when not given); ``pending`` undoes the earlier ones."""
        rec = self._read(record_id)
        if decision == "approved" and sku is None:
            chosen = rec.get("chosen_sku")
            sku = chosen if isinstance(chosen, str) else None
        if decision in ("approved", "reassigned") and not sku:
            raise FeedbackStoreError(f"{record_id}: {decision} needs a product sku")
        if decision in ("rejected", "not_carried", "pending"):
            sku = None
        entry = DecisionEntry(record_id, decision, sku, who, utc_now_iso(), note)
        line = json.dumps(_entry_dict(entry), separators=(",", ":")) + "\n"
        with self._lock:
            self._b.append_decision(line.encode())
        return entry

    # ---- reading ----

    def history(self, record_id: str | None = None) -> list[DecisionEntry]:
        """Every decision in order (of one record, when given); a torn last line is skipped."""
        out: list[DecisionEntry] = []
        for line in self._b.decision_lines():
            try:
                d = json.loads(line)
                entry = DecisionEntry(d["record_id"], d["decision"], d.get("sku"), d["who"], d["ts"],
                                      d.get("note", ""))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a power cut mid-append
            if record_id is None or entry.record_id == record_id:
                out.append(entry)
        return out

    def records(self, store: str | None = None) -> list[FeedbackRecord]:
        """Every record (of one store), oldest first, with its review status applied."""
        last = {e.record_id: e for e in self.history()}
        out = []
        for rid in self._record_ids():
            raw = self._read(rid)
            if store is not None and raw["store"] != store:
                continue
            out.append(_record(raw, last.get(rid)))
        out.sort(key=lambda r: (r.ts, r.record_id))
        return out

    def get(self, record_id: str) -> FeedbackRecord:
        last = self.history(record_id)
        return _record(self._read(record_id), last[-1] if last else None)

    def crop_path(self, record_id: str) -> Path:
        """A local file with the record's crop (an S3 store's cached copy); absent if the crop is."""
        return self._b.local_file(f"crops/{self._read(record_id)['crop_sha256']}.jpg")

    def vector(self, record_id: str) -> np.ndarray:
        raw = self._read(record_id)
        return decode_vector(str(raw["vector"]), int(str(raw["dim"])))

    def approved(self, store: str | None = None) -> list[FeedbackRecord]:
        """Records that are store photos of a product (approved or reassigned)."""
        return [r for r in self.records(store) if r.status == "approved" and r.label_sku]

    def _record_ids(self) -> Iterator[str]:
        for name in self._b.names("records"):
            if name.endswith(".json") and not name.startswith("."):
                yield name[: -len(".json")]

    def _read(self, record_id: str) -> dict[str, object]:
        if not record_id.isalnum():
            raise FeedbackStoreError(f"{record_id!r} is not a record id")
        raw = self._b.read(f"records/{record_id}.json")
        if raw is None:
            raise FeedbackStoreError(f"no feedback record {record_id}")
        try:
            data: dict[str, object] = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise FeedbackStoreError(f"feedback record {record_id} is not JSON: {exc}") from exc
        return data


def _entry_dict(e: DecisionEntry) -> dict[str, object]:
    return {"record_id": e.record_id, "decision": e.decision, "sku": e.sku, "who": e.who, "ts": e.ts,
            "note": e.note}


def _record(raw: dict[str, object], last: DecisionEntry | None) -> FeedbackRecord:
    answer = str(raw["answer"])
    status: Status
    label: str | None = None
    if last is None or last.decision == "pending":
        status = "unlabelled" if answer == "no_answer" else "pending"
    elif last.decision in ("approved", "reassigned"):
        status, label = "approved", last.sku
    elif last.decision == "not_carried":
        status = "not_carried"
    else:
        status = "rejected"
    shown = raw.get("shown") or []
    top = raw.get("top_score")
    return FeedbackRecord(
        record_id=str(raw["record_id"]), store=str(raw["store"]), kiosk=str(raw["kiosk"]),
        ts=str(raw["ts"]), received=str(raw["received"]), answer=answer,
        chosen_sku=None if raw.get("chosen_sku") is None else str(raw["chosen_sku"]),
        shown=tuple(str(s) for s in shown) if isinstance(shown, list) else (),
        top_score=float(top) if isinstance(top, (int, float)) else None,
        model=str(raw["model"]), snapshot=int(str(raw["snapshot"])), crop_sha256=str(raw["crop_sha256"]),
        status=status, label_sku=label, decided_by=None if last is None else last.who,
        decided_ts=None if last is None else last.ts,
    )


FeedbackSource = str | Path | FeedbackStore  # where a feedback store is, or the store itself
