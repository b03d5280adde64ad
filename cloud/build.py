"""Catalog -> signed snapshot directory (full, or a delta against a previous one) plus a build report.

The "no match" decision that ships with it is fitted by ``cloud.open_set.fit_for_snapshot``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cloud import delta as d
from cloud import open_set, retrieval
from cloud.build_spec import BuildError, BuildResult, BuildSpec
from cloud.cache import EmbeddingCache
from cloud.catalog import Catalog, load_catalog
from cloud.featurize import Features, featurize, model_fingerprint, preprocessing_hash
from cloud.feedback import relearn
from cloud.feeds.download import Downloader, http_sources
from cloud.feeds.summary import catalog_fields
from models.bundle import BundleManifest
from storelens import vindex
from storelens.archive import pack
from storelens.fsutil import atomic_write_bytes, atomic_write_json
from storelens.matching import NOT_CARRIED_KEY
from storelens.snapshot import (
    MANIFEST,
    Canary,
    HnswParams,
    Projection,
    SnapshotManifest,
    describe_files,
    read_manifest_unverified,
    utc_now_iso,
    write_signed,
)
from storelens.swap import install_output, recover_for_reading, recover_output, staging_archive, staging_dir

_LOGGER = logging.getLogger(__name__)

__all__ = ["BuildError", "BuildResult", "BuildSpec", "build_snapshot"]

CANARIES = 8  # enough to catch a wrong model/index pairing; each costs dim*4 bytes in the manifest
EXPIRES_DAYS = 30  # a kiosk flags its catalog stale after this (reliability A5)
PROJECTION = "projection.bin"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def thumb_name(sku: str) -> str:
    """Snapshot-relative thumbnail path for a sku: safe characters plus a hash against collisions."""
    safe = _SAFE.sub("_", sku).lstrip("._-")[:40] or "item"
    return f"{d.THUMBS}/{safe}-{hashlib.sha256(sku.encode()).hexdigest()[:8]}.jpg"


def _canaries(vectors: npt.NDArray[np.float32], skus: list[str]) -> list[Canary]:
    """A few catalog vectors (first image of evenly spaced items) with the sku a search must return."""
    firsts: dict[str, int] = {}
    for i, s in enumerate(skus):
        firsts.setdefault(s, i)
    picks = list(firsts.values())
    picks = (
        [picks[int(i)] for i in np.linspace(0, len(picks) - 1, min(CANARIES, len(picks)))] if picks else []
    )
    return [
        Canary(sku=skus[i], embedding=base64.b64encode(vectors[i].astype("<f4").tobytes()).decode())
        for i in dict.fromkeys(picks)
    ]


def _item_rows(catalog: Catalog, store: str, feats: Features) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for r in feats.rows:
        counts[r.sku] = counts.get(r.sku, 0) + 1
    rows = []
    for it in catalog.for_store(store):
        if it.sku not in counts:
            continue
        thumb = feats.thumbs.get(it.sku)
        rows.append(
            {
                **it.metadata(),
                "thumbnail": thumb_name(it.sku) if thumb else None,
                "thumb_sha256": hashlib.sha256(thumb).hexdigest() if thumb else None,
                "vectors": counts[it.sku],
            }
        )
    return d.sort_items(rows)


def _open_embedder(bundle: Path, cache_dir: Path | None) -> Any:
    from models.embedder import Embedder

    return Embedder(bundle, mode="throughput", cache_dir=cache_dir)


def report_path_of(out_dir: Path) -> Path:
    """Where a build's report JSON lands: beside its snapshot folder, ``{name}.report.json``."""
    return out_dir.with_name(f"{out_dir.name}.report.json")


def _check_out(out: Path) -> None:
    """Refuse an output path that holds something other than a snapshot: the build replaces its output, and
    a typo naming the catalog file or a photo folder would have moved it aside as ``.NAME.old``, which the
    next build deletes."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BuildError(f"output {out} is a file or a symlink, not a snapshot folder: give a new or empty "
                         "folder (it is left as it is)")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise BuildError(f"output {out} is a folder that holds no snapshot: give a new or empty folder "
                         "(a build replaces its output whole; the folder is left as it is)")


def build_snapshot(spec: BuildSpec) -> BuildResult:
    """Build, sign and write the snapshot ``spec`` describes; a report JSON lands beside its ``out_dir``.

    With ``spec.archive`` ``out_dir.tar`` is written too (without, an older one is removed: it would not
    agree); both are switched crash-safe by ``storelens.swap``, which first finishes or undoes a swap
    that a crash interrupted and removes an unfinished build's leftovers. With ``spec.feedback`` the
    approved store photos of the store's products join their images (``cloud.feedback.relearn``, rows
    marked ``store``).
    """
    catalog_path, store, base, version = spec.catalog, spec.store, spec.base, spec.version
    out_dir, cache_dir, progress, feedback, features = spec.out_dir, spec.cache_dir, spec.progress, \
        spec.feedback, spec.features
    embedder = spec.embedder
    _check_out(Path(out_dir))
    recover_output(out_dir, discard_staged=True)
    if base is not None:
        recover_for_reading(base)
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    catalog = load_catalog(catalog_path, location_column=spec.location_column, progress=progress)
    items = catalog.for_store(store)
    if not items:
        raise BuildError(f"catalog has no valid items for store {store!r} ({len(catalog.errors)} bad rows)")
    try:
        sel = relearn.select_approved(feedback, store, items) if feedback is not None else None
    except relearn.FeedbackError as exc:
        raise BuildError(str(exc)) from exc
    own = embedder is None
    if embedder is None:
        assert spec.bundle is not None  # BuildSpec checked: a bundle or an embedder
        embedder = _open_embedder(spec.bundle, cache_dir)
    cache = EmbeddingCache(cache_dir / "embeddings.sqlite") if cache_dir else None
    # Photos given as URLs land in the cache's images/ (a rebuild fetches nothing), else only for this build.
    urls = http_sources(s for it in items for s in it.images) if features is None else []
    images_dir = cache_dir / "images" if cache_dir else None
    if images_dir is None and urls:
        images_dir = Path(tempfile.mkdtemp(prefix="storelens-images-"))
    downloader = Downloader(images_dir) if images_dir is not None else None
    try:
        if downloader is not None:
            downloader.prefetch(urls, progress=progress)
        feats = features if features is not None else featurize(
            relearn.with_store_photos(items, sel) if sel is not None else items,
            embedder, base_dir=catalog.base_dir, cache=cache, progress=progress, s3_client=spec.s3_client,
            downloader=downloader,
        )  # fmt: skip
        views = relearn.store_photo_views(feats, sel, embedder, cache, model_fingerprint(embedder)) if (
            sel is not None and features is None) else {}  # fmt: skip
        model_id, pre_hash = str(embedder.model_id), preprocessing_hash(embedder)
    finally:
        if downloader is not None:
            downloader.close()
        if cache_dir is None and images_dir is not None:
            shutil.rmtree(images_dir, ignore_errors=True)
        if cache is not None:
            cache.close()
        if own:
            getattr(embedder, "close", lambda: None)()
    if not feats.rows:
        raise BuildError("no catalog image could be embedded")
    fb_report, not_carried = None, np.zeros((0, feats.dim), np.float32)
    if sel is not None:
        feats, not_carried = relearn.split_not_carried(feats)  # rejection rows, beside the index
        feats, fb_report = relearn.cap_store_photos(feats, sel, spec.feedback_cap)
        fb_report["not_carried"] = len(not_carried)
    item_rows = _item_rows(catalog, store, feats)
    skus = [r.sku for r in feats.rows]
    base_m = read_manifest_unverified(base) if base is not None else None
    if version is None:
        version = base_m.version + 1 if base_m else 1
    if base_m is not None and version <= base_m.version:
        raise BuildError(f"version {version} must be above the base's {base_m.version}")
    report: dict[str, Any] = {
        "store": store,
        "version": version,
        "catalog": str(catalog_path),
        **catalog_fields(catalog),
        "items_for_store": len(items),
        "bad_images": feats.bad_images,
        "images_downloaded": downloader.downloaded if downloader is not None else 0,
        "items_without_images": sorted({it.sku for it in items} - set(skus)),
        "images_embedded": feats.embedded,
        "cache_hits": feats.cache_hits,
        "vectors": len(skus),
        "items": len(item_rows),
    }
    if fb_report is not None:
        report["feedback"] = fb_report
    vec_rows = relearn.vector_rows(feats, sel)
    plan, reason = None, None
    if base is not None and base_m is not None:
        reason = _delta_blocker(base, base_m, model_id, feats.dim)
        reason = reason or open_set.recalibrate_reason(base_m, skus)
        reason = reason or relearn.not_carried_reason(base_m.extra, not_carried)
        if reason is None:
            plan = d.plan_delta(
                d.read_rows(base / d.ITEMS), d.read_rows(base / d.VECTORS), item_rows, vec_rows
            )
            if plan.fraction > spec.delta_max_fraction:
                changed = f"{plan.fraction:.0%} of vectors changed (> {spec.delta_max_fraction:.0%})"
                reason, plan = changed, None
        report["delta_fallback"] = reason
    kind: Literal["full", "delta"] = "delta" if plan is not None else "full"
    # A delta keeps its base's projection (its vectors must live in the same space); a full build refits.
    if plan is not None and base is not None and base_m is not None:
        proj = _read_projection(base, base_m)
        threshold = base_m.threshold
        tstats = {"method": "inherited", "from_version": base_m.version}
        base_stats = base_m.extra.get("threshold")
        if isinstance(base_stats, dict) and isinstance(base_stats.get("warning"), str):
            tstats["warning"] = base_stats["warning"]  # still true of this delta
    else:
        with one_blas_thread():
            proj, tstats = open_set.fit_for_snapshot(feats.vectors, skus, spec.adapter,
                                                     relearn.view_rows(feats, views))  # fmt: skip
        threshold = float(tstats["threshold"])  # type: ignore[arg-type]
    with one_blas_thread():
        index_vectors = proj.apply(feats.vectors) if proj is not None else feats.vectors
    report.update(threshold=threshold, threshold_stats=tstats, adapter=spec.adapter if proj else "none",
                  warnings=[tstats["warning"]] if "warning" in tstats else [])  # fmt: skip
    common: dict[str, Any] = {
        "store": store,
        "version": version,
        "model_id": model_id,
        "preprocessing_hash": pre_hash,
        "model_dim": feats.dim,
        "dim": proj.out_dim if proj is not None else feats.dim,
        "projection": (
            None if proj is None else Projection(file=PROJECTION, in_dim=proj.in_dim, out_dim=proj.out_dim)
        ),
        "item_count": len(item_rows),
        "vector_count": len(skus),
        "hnsw": HnswParams(M=spec.M, ef_construction=spec.ef_construction, ef=spec.ef),
        "threshold": threshold,
        "canary": _canaries(feats.vectors, skus),
        "created_at": utc_now_iso() if spec.created_at is None else _iso_z(spec.created_at),
        "expires_at": ((spec.created_at or datetime.now(UTC)) + timedelta(days=EXPIRES_DAYS)).isoformat(
            timespec="seconds"
        ),
    }
    tmp = staging_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / d.THUMBS).mkdir(parents=True)
    extra: dict[str, Any] = {"threshold": tstats}
    if isinstance(tstats.get("open_set"), dict):
        extra["open_set"] = tstats["open_set"]
    elif plan is not None and base_m is not None and "open_set" in base_m.extra:
        extra["open_set"] = base_m.extra["open_set"]
    if proj is not None:
        atomic_write_bytes(tmp / PROJECTION, proj.to_bytes())
    if plan is not None and base is not None and base_m is not None:
        extra["delta"] = _write_delta(tmp, base, plan, item_rows, vec_rows, feats, index_vectors)
        common.update(base_version=base_m.version, base_manifest_sha256=d.snapshot_identity(base)[1])
    else:
        _write_full(tmp, item_rows, vec_rows, feats, index_vectors, spec.M, spec.ef_construction, spec.ef)
        if (rejects := relearn.write_not_carried(tmp, proj, not_carried, feats, sel)) is not None:
            extra[NOT_CARRIED_KEY] = rejects
    report["kind"] = kind
    extra["build"] = {k: report[k] for k in ("images_embedded", "cache_hits", "vectors", "items")}
    bundle_m = getattr(embedder, "manifest", None)
    if isinstance(bundle_m, BundleManifest):  # the dashboard shows this name, not the sha256
        extra["model"] = bundle_m.describe()
    names = [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]
    manifest = SnapshotManifest(kind=kind, files=describe_files(tmp, names), extra=extra, **common)
    write_signed(tmp, manifest, spec.private_key)
    if spec.archive:
        pack(tmp, staging_archive(out_dir))
    install_output(out_dir, archive=spec.archive)
    report["build_s"] = round(time.monotonic() - t0, 2)
    report_path = report_path_of(out_dir)
    atomic_write_json(report_path, report)
    _LOGGER.info(
        "built %s snapshot v%d of %s: %d items, %d vectors", kind, version, store, len(item_rows), len(skus)
    )
    return BuildResult(out_dir, read_manifest_unverified(out_dir), report, report_path)


def one_blas_thread() -> Any:
    """BLAS on one thread for the fit: OpenBLAS sums in another order on more threads, and the adapter,
    index and signature came out different on 1 and 2 threads (dim 256+), so a snapshot's bytes depended
    on the machine and on the engine (Ray runs tasks with OMP_NUM_THREADS=1)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _iso_z(t: datetime) -> str:
    """``t`` as ``storelens.snapshot.utc_now_iso`` writes the current time."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _read_projection(base: Path, base_m: SnapshotManifest) -> retrieval.Adapter | None:
    if base_m.projection is None:
        return None
    p = base_m.projection
    return retrieval.Adapter.from_bytes((base / p.file).read_bytes(), p.in_dim, p.out_dim)


def _delta_blocker(base: Path, base_m: SnapshotManifest, model_id: str, dim: int) -> str | None:
    if base_m.kind != "full":
        return "base is a delta: build against its applied (full-equivalent) directory"
    if base_m.model_id != model_id or base_m.model_dim != dim:
        return "model changed since the base"
    if not (base / d.ITEMS).is_file() or not (base / d.VECTORS).is_file():
        return "base lacks items/vectors rows"
    return None


def _write_thumbs(tmp: Path, rows: list[dict[str, Any]], feats: Features) -> None:
    for r in rows:
        if r["thumbnail"]:
            atomic_write_bytes(tmp / r["thumbnail"], feats.thumbs[r["sku"]])


def _write_full(
    tmp: Path,
    item_rows: list[dict[str, Any]],
    vec_rows: list[dict[str, Any]],
    feats: Features,
    index_vectors: npt.NDArray[np.float32],
    M: int,
    ef_construction: int,
    ef: int,
) -> None:
    index = vindex.build(
        index_vectors, np.arange(len(vec_rows), dtype=np.int64), M=M, ef_construction=ef_construction, ef=ef
    )
    index.save(tmp / d.INDEX)
    atomic_write_bytes(tmp / d.ITEMS, d.rows_bytes(item_rows))
    atomic_write_bytes(tmp / d.VECTORS, d.rows_bytes(vec_rows))
    _write_thumbs(tmp, item_rows, feats)


def _write_delta(
    tmp: Path,
    base: Path,
    plan: d.DeltaPlan,
    item_rows: list[dict[str, Any]],
    vec_rows: list[dict[str, Any]],
    feats: Features,
    index_vectors: npt.NDArray[np.float32],
) -> dict[str, Any]:
    added_rows = [{**vec_rows[i], "label": lbl} for i, lbl in zip(plan.added, plan.added_labels, strict=True)]
    atomic_write_bytes(tmp / d.ADDED_VECTORS, index_vectors[plan.added].astype("<f4").tobytes())
    atomic_write_bytes(tmp / d.ADDED_ROWS, d.rows_bytes(added_rows))
    atomic_write_bytes(
        tmp / d.REMOVED,
        json.dumps({"labels": plan.deleted_labels, "skus": plan.removed_skus}, sort_keys=True).encode(),
    )
    atomic_write_bytes(tmp / d.ITEMS, d.rows_bytes(plan.changed_items))
    _write_thumbs(tmp, plan.changed_items, feats)
    items, vectors = d.merge_rows(
        d.read_rows(base / d.ITEMS),
        d.read_rows(base / d.VECTORS),
        plan.changed_items,
        plan.removed_skus,
        added_rows,
        plan.deleted_labels,
    )
    return {
        "result": {
            d.ITEMS: hashlib.sha256(d.rows_bytes(items)).hexdigest(),
            d.VECTORS: hashlib.sha256(d.rows_bytes(vectors)).hexdigest(),
        },
        "added": len(added_rows),
        "deleted": len(plan.deleted_labels),
        "changed_items": len(plan.changed_items),
        "removed_items": len(plan.removed_skus),
        "fraction": round(plan.fraction, 4),
    }
