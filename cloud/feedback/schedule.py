"""`feedback relearn` as a scheduled job (deploy/systemd/storelens-relearn.{service,timer,path}): optionally
auto-review, build the store's next snapshot with the approved store photos only when something it uses
changed, and publish it (folder/S3 + the retained announcement kiosks sync from).

"Changed" is a digest of the inputs: the catalog file's bytes, the bundle's model id, the cap, and the
approved (record, product) pairs and not-carried records the build would read. It is written into each
relearned snapshot's report (``v{N}.report.json``, beside the snapshot) and compared with the newest one's,
so a nightly timer and a burst of collector requests make one new snapshot, not one per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.build import BuildResult, BuildSpec, build_snapshot, report_path_of
from cloud.catalog import load_catalog
from cloud.feedback.relearn import DEFAULT_CAP, FeedbackError, Selection, select_approved
from cloud.feedback.store import FeedbackSource
from storelens.fsutil import atomic_write_json, sha256_file
from storelens.snapshot import read_manifest_unverified

_LOGGER = logging.getLogger(__name__)

RELEARN_TMP = ".relearn-new"  # the build's folder until it is renamed to v{N}


@dataclass(frozen=True, slots=True)
class Relearned:
    """What one run did: ``built`` is None when nothing changed since ``previous``."""

    digest: str
    previous: Path | None  # the newest snapshot of the store before this run
    built: BuildResult | None = None
    final: Path | None = None  # where the new snapshot now is (``snapshots/v{N}``)
    auto_approved: int = 0


def newest_snapshot(snapshots: Path, store: str, *, full_only: bool = False) -> Path | None:
    """The highest-version snapshot of ``store`` directly under ``snapshots`` (only full ones if asked)."""
    best: tuple[int, Path] | None = None
    for d in sorted(p for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            m = read_manifest_unverified(d)
        except (OSError, ValueError):
            continue  # not a snapshot (a report folder, a partial write)
        if m.store == store and (m.kind == "full" or not full_only) and (best is None or m.version > best[0]):
            best = (m.version, d)
    return None if best is None else best[1]


def inputs_digest(sel: Selection, catalog: Path, model_id: str, cap: int) -> str:
    """The sha256 of everything a relearn build reads (see the module doc)."""
    body = {
        "catalog_sha256": sha256_file(catalog),
        "model_id": model_id,
        "cap": cap,
        "photos": sorted((p.record_id, p.sku) for ps in sel.photos.values() for p in ps),
        "not_carried": sorted(p.record_id for p in sel.not_carried),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def recorded_digest(snapshot: Path | None) -> str | None:
    """The inputs digest a relearn wrote beside ``snapshot`` (None: not a relearn's, or unreadable)."""
    if snapshot is None:
        return None
    try:
        d = json.loads(report_path_of(snapshot).read_text(encoding="utf-8")).get("inputs_digest")
    except (OSError, ValueError, AttributeError):
        return None
    return d if isinstance(d, str) else None


def relearn(
    store: str,
    feedback: FeedbackSource,
    catalog: Path,
    bundle: Path,
    snapshots: Path,
    private_key: Any,
    *,
    cache_dir: Path | None = None,
    cap: int = DEFAULT_CAP,
    auto_review: bool = False,
    force: bool = False,
) -> Relearned:
    """One relearn run (FeedbackError, BuildError or ModelError on bad input; nothing is written then)."""
    from cloud.feedback.auto import AutoReviewError, ReviewSpace, auto_review_all
    from cloud.feedback.store import FeedbackStoreError, open_feedback_store
    from models.bundle import read_manifest

    if not snapshots.is_dir():
        raise FeedbackError(f"snapshots folder {snapshots} does not exist")
    try:
        fb = open_feedback_store(feedback)  # once: the review, the digest's selection and the build read it
    except FeedbackStoreError as exc:
        raise FeedbackError(str(exc)) from exc
    base = newest_snapshot(snapshots, store, full_only=True)
    approved = 0
    if auto_review:
        if base is None:
            raise FeedbackError(f"--auto-review needs a full snapshot of {store} in {snapshots}")
        try:
            approved = auto_review_all(fb, store, ReviewSpace.load(base)).approved
        except (AutoReviewError, FeedbackStoreError) as exc:
            raise FeedbackError(str(exc)) from exc
    items = load_catalog(catalog).for_store(store)
    sel = select_approved(fb, store, items)
    digest = inputs_digest(sel, catalog, read_manifest(bundle).model_id, cap)
    previous = newest_snapshot(snapshots, store)
    if not force and recorded_digest(previous) == digest:
        return Relearned(digest, previous, auto_approved=approved)
    out = snapshots / RELEARN_TMP
    res = build_snapshot(BuildSpec(catalog=catalog, store=store, out_dir=out, private_key=private_key,
                                   bundle=bundle, base=base, cache_dir=cache_dir, feedback=fb,
                                   feedback_cap=cap, progress=False))  # fmt: skip
    final = snapshots / f"v{res.manifest.version}"
    if final.exists():
        raise FeedbackError(f"{final} already exists")
    out.rename(final)
    report = dict(res.report, inputs_digest=digest)
    atomic_write_json(report_path_of(final), report)
    if res.report_path is not None:
        res.report_path.unlink(missing_ok=True)
    return Relearned(digest, previous, res, final, approved)
