"""The feedback store: accepted kiosk feedback, content-addressed and de-duplicated, plus staff decisions.

Layout under one root folder (one store's or many stores' feedback):

    records/{record_id}.json   the message minus its crop (vector kept), plus ``crop_sha256``, ``received``
    crops/{sha256}.jpg         the held item's crop, content-addressed (identical crops stored once)
    decisions.jsonl            append-only: one staff (or auto-rule) decision per line; the last line
                               for a record wins, so every decision is reversible and keeps who/when

``record_id`` is derived from (store, kiosk, message id): a replayed message is the same record. Every
write is atomic and fsynced before ``put`` returns, so a collector may acknowledge the message after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from storelens.feedback import FeedbackEvent, decode_vector
from storelens.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir
from storelens.snapshot import utc_now_iso

Decision = Literal["approved", "rejected", "reassigned", "not_carried", "pending"]
Status = Literal["pending", "approved", "rejected", "not_carried", "unlabelled"]


class FeedbackStoreError(Exception):
    """A record or decision that cannot be read or written (names the record and the problem)."""


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


class FeedbackStore:
    """Feedback records and decisions in a local folder (see the module doc for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._records = self.root / "records"
        self._crops = self.root / "crops"
        self._decisions = self.root / "decisions.jsonl"
        self._lock = threading.Lock()
        for d in (self._records, self._crops):
            d.mkdir(parents=True, exist_ok=True)

    # ---- writing ----

    def put(self, msg: FeedbackEvent) -> tuple[str, bool]:
        """Store one verified message durably; returns (record_id, False when it was already stored)."""
        rid = record_id_of(msg.store, msg.kiosk, msg.id)
        path = self._records / f"{rid}.json"
        with self._lock:
            if path.exists():
                return rid, False
            crop = msg.crop_bytes()
            crop_sha = hashlib.sha256(crop).hexdigest()
            crop_path = self._crops / f"{crop_sha}.jpg"
            if not crop_path.exists():
                atomic_write_bytes(crop_path, crop)
            body = msg.model_dump(mode="json", exclude={"crop_jpeg"})
            body.update(record_id=rid, crop_sha256=crop_sha, received=utc_now_iso())
            atomic_write_json(path, body)
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
            fd = os.open(self._decisions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.root)
        return entry

    # ---- reading ----

    def history(self, record_id: str | None = None) -> list[DecisionEntry]:
        """Every decision in order (of one record, when given); a torn last line is skipped."""
        out: list[DecisionEntry] = []
        if not self._decisions.exists():
            return out
        for line in self._decisions.read_text(encoding="utf-8").splitlines():
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
        return self._crops / f"{self._read(record_id)['crop_sha256']}.jpg"

    def vector(self, record_id: str) -> np.ndarray:
        raw = self._read(record_id)
        return decode_vector(str(raw["vector"]), int(str(raw["dim"])))

    def approved(self, store: str | None = None) -> list[FeedbackRecord]:
        """Records that are store photos of a product (approved or reassigned)."""
        return [r for r in self.records(store) if r.status == "approved" and r.label_sku]

    def _record_ids(self) -> Iterator[str]:
        for p in sorted(self._records.glob("*.json")):
            yield p.stem

    def _read(self, record_id: str) -> dict[str, object]:
        if not record_id.isalnum():
            raise FeedbackStoreError(f"{record_id!r} is not a record id")
        try:
            data: dict[str, object] = json.loads((self._records / f"{record_id}.json").read_text("utf-8"))
        except FileNotFoundError as exc:
            raise FeedbackStoreError(f"no feedback record {record_id}") from exc
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
