"""The review queue's JSON API: feedback records of one store, their crops, staff decisions.

    GET  /api/review?status=pending|decided|all[&store=S]   records + the catalog + who is signed in
    GET  /api/review/crop/<record_id>.jpg                    the crop (image/jpeg); ids checked, no paths
    POST /api/review/decide   {"record_id", "decision", "sku"?}   X-StoreLens-Review: 1, JSON body

Decisions go to ``FeedbackStore.decide`` with the signed-in staff name as ``who``. What a record may
become depends on the customer's answer: a confirmation is approved, rejected or re-assigned to another
product; a "Not here" is assigned to a product the store carries or marked not carried; ``pending``
undoes any decision. A product must be in the newest snapshot's catalog.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.dashboard.snapshots import SnapshotShelf
from cloud.feedback.store import DecisionEntry, FeedbackRecord, FeedbackStore, FeedbackStoreError

_LOGGER = logging.getLogger(__name__)

API = "/api/review"
CROP_PREFIX = API + "/crop/"
DECIDE = API + "/decide"
CSRF_HEADER = "X-StoreLens-Review"  # a custom header: a cross-site form or image cannot send it
MAX_BODY_BYTES = 4096
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")
_ALLOWED = {
    "confirmed": {"approved", "rejected", "reassigned", "pending"},
    "not_here": {"reassigned", "not_carried", "rejected", "pending"},
}
_DECIDED = ("approved", "rejected", "not_carried")


class ReviewError(Exception):
    """A request the review API refuses; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_record_id(text: str) -> str:
    """A record id as the feedback store makes them (32 hex digits); never a path."""
    if not _RECORD_ID.match(text):
        raise ReviewError(400, f"{text[:40]!r} is not a record id")
    return text


@dataclass(frozen=True, slots=True)
class ReviewQueue:
    """One store's queue over a feedback store and the store's snapshots."""

    feedback: FeedbackStore
    shelf: SnapshotShelf
    store: str

    def _record(self, record_id: str) -> FeedbackRecord:
        try:
            rec = self.feedback.get(check_record_id(record_id))
        except FeedbackStoreError as exc:
            raise ReviewError(404, str(exc)) from exc
        if rec.store != self.store:  # another store's photo: as if it were not there
            raise ReviewError(404, f"no feedback record {record_id} in store {self.store}")
        return rec

    def crop(self, record_id: str) -> Path:
        """The crop file of a record of this store."""
        self._record(record_id)
        path = self.feedback.crop_path(record_id)
        if not path.is_file():
            raise ReviewError(404, f"the crop of {record_id} is missing")
        return path

    def listing(self, status: str, store: str | None, who: str) -> dict[str, Any]:
        """Records of this store by status ('pending', 'decided', 'all'), the catalog, the staff name."""
        if store is not None and store != self.store:
            raise ReviewError(403, f"this dashboard reviews store {self.store}, not {store[:64]!r}")
        if status not in ("pending", "decided", "all"):
            raise ReviewError(400, f"status {status[:20]!r}: use pending, decided or all")
        last: dict[str, DecisionEntry] = {e.record_id: e for e in self.feedback.history()}
        records = []
        for r in self.feedback.records(self.store):
            if r.answer == "no_answer":
                continue  # kept for counts, never a label: nothing to review
            decided = r.status in _DECIDED
            if (status == "pending" and r.status != "pending") or (status == "decided" and not decided):
                continue
            records.append(_record_json(r, last.get(r.record_id)))
        version, items = self.shelf.catalog()
        catalog = [{"sku": it.sku, "title": it.title,
                    "thumbnail": f"snapshots/{it.version}/{it.thumbnail}" if it.thumbnail else None}
                   for it in items]  # fmt: skip
        return {"store": self.store, "who": who, "catalog_version": version, "catalog": catalog,
                "records": records}  # fmt: skip

    def decide(self, body: Any, who: str) -> dict[str, Any]:
        """Apply one decision from a parsed JSON body; returns the record as it now stands."""
        if not isinstance(body, dict):
            raise ReviewError(400, "the body must be a JSON object")
        rid, decision, sku = body.get("record_id"), body.get("decision"), body.get("sku")
        if not isinstance(rid, str) or not isinstance(decision, str):
            raise ReviewError(400, "record_id and decision are required strings")
        if sku is not None and not isinstance(sku, str):
            raise ReviewError(400, "sku must be a string")
        rec = self._record(rid)
        allowed = _ALLOWED.get(rec.answer, set())
        if decision not in allowed:
            raise ReviewError(400, f"a {rec.answer} record cannot be {decision[:20]!r} "
                                   f"(allowed: {', '.join(sorted(allowed)) or 'nothing'})")  # fmt: skip
        if decision == "reassigned":
            if not sku:
                raise ReviewError(400, "re-assigning needs the product's sku")
            known = {it.sku for it in self.shelf.catalog()[1]}
            if sku not in known:
                raise ReviewError(400, f"{sku[:64]!r} is not a product of store {self.store}'s catalog")
        label = sku if decision == "reassigned" else None
        try:
            entry = self.feedback.decide(rid, decision, who=who, sku=label)  # type: ignore[arg-type]
        except FeedbackStoreError as exc:
            raise ReviewError(400, str(exc)) from exc
        _LOGGER.info("review: %s %s %s%s", who, entry.decision, rid, f" as {entry.sku}" if entry.sku else "")
        return _record_json(self.feedback.get(rid), entry)


def _record_json(r: FeedbackRecord, last: DecisionEntry | None) -> dict[str, Any]:
    return {
        "record_id": r.record_id, "kiosk": r.kiosk, "ts": r.ts, "answer": r.answer,
        "chosen_sku": r.chosen_sku, "shown": list(r.shown), "top_score": r.top_score,
        "snapshot": r.snapshot, "status": r.status, "label_sku": r.label_sku,
        "decision": None if last is None else last.decision,
        "decided_by": r.decided_by, "decided_ts": r.decided_ts,
        "crop": f"{CROP_PREFIX}{r.record_id}.jpg",
    }  # fmt: skip
