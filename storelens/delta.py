"""Delta snapshots, the part both sides need: the row files, merging them, and applying a delta.

The cloud diffs and builds deltas (``cloud/delta.py``, ``cloud/build.py``); kiosks apply them
(``device/sync``). Both use this one definition of the row files and of what "base + delta" means.

A full snapshot holds ``index.bin``, ``items.jsonl`` (one item per line, sorted by sku) and
``vectors.jsonl`` (one indexed vector per line: label, sku, image sha256, sorted by label). A delta holds
``added.f32`` (little-endian float32 rows), ``added.jsonl`` (their vectors.jsonl rows), ``removed.json``
(deleted labels and skus), ``items.jsonl`` (new or changed items only) and their thumbnails. Its signed
manifest names the base (version and manifest sha256) and, in ``extra["delta"]["result"]``, the sha256 of
the merged items.jsonl and vectors.jsonl, which :func:`apply_delta` checks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from storelens import vindex
from storelens.fsutil import atomic_write_bytes, fsync_dir, read_capped
from storelens.snapshot import (
    MANIFEST,
    RejectReason,
    SnapshotManifest,
    SnapshotRejected,
    describe_files,
    manifest_sha256,
    read_manifest_unverified,
)

INDEX = "index.bin"
ITEMS = "items.jsonl"
VECTORS = "vectors.jsonl"
ADDED_VECTORS = "added.f32"
ADDED_ROWS = "added.jsonl"
REMOVED = "removed.json"
THUMBS = "thumbs"
APPLIED = "applied"  # key in an applied directory's (unsigned) manifest extra: the delta it came from
MAX_ROWS_BYTES = 512 << 20  # row files of a 1M-vector store are ~100 MB; refuse anything absurd


def rows_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Canonical JSON Lines bytes (sorted keys, compact): equal rows give equal hashes."""
    return b"".join(
        json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        for r in rows
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON Lines row file (size-capped); ValueError on anything malformed."""
    out = []
    for n, line in enumerate(read_capped(path, MAX_ROWS_BYTES).decode("utf-8").splitlines(), 1):
        if line.strip():
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"{path.name}:{n} is not a JSON object")
            out.append(obj)
    return out


def sort_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda r: str(r["sku"]))


def sort_vectors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: int(r["label"]))


def is_applied(manifest: SnapshotManifest) -> bool:
    """True for the unsigned manifest :func:`apply_delta` writes (its index keeps deleted vectors)."""
    return isinstance(manifest.extra.get(APPLIED), dict)


def snapshot_identity(directory: Path) -> tuple[int, str]:
    """(version, manifest sha256) a delta must chain to; an applied dir answers for its signed delta."""
    m = read_manifest_unverified(directory)
    applied = m.extra.get(APPLIED)
    if isinstance(applied, dict) and isinstance(applied.get("manifest_sha256"), str):
        return m.version, str(applied["manifest_sha256"])
    return m.version, manifest_sha256(directory)


def merge_rows(
    base_items: list[dict[str, Any]],
    base_vectors: list[dict[str, Any]],
    changed_items: list[dict[str, Any]],
    removed_skus: list[str],
    added_rows: list[dict[str, Any]],
    deleted_labels: list[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The merged (items, vectors) rows of base + delta, in canonical order."""
    items = {str(r["sku"]): r for r in base_items}
    for sku in removed_skus:
        items.pop(sku, None)
    for r in changed_items:
        items[str(r["sku"])] = r
    gone = set(deleted_labels)
    vectors = [r for r in base_vectors if int(r["label"]) not in gone] + list(added_rows)
    return sort_items(list(items.values())), sort_vectors(vectors)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def apply_delta(base_dir: Path, delta_dir: Path, out_dir: Path) -> SnapshotManifest:
    """Apply a (verified) delta to a (verified) base; write a full-equivalent snapshot dir to ``out_dir``.

    The base index is loaded with room for the added vectors, ``add_items`` + ``mark_deleted`` run on that
    private copy (never a live index), and the merged row files must hash to what the signed delta says.
    ``base_dir`` is only read. The result's manifest.json is unsigned local state: ``extra["applied"]``
    names the delta it came from. With one thread hnswlib is deterministic, so the same base and delta
    give the same bytes (kiosks re-derive an applied directory at boot to trust it again).
    """
    base_dir, delta_dir, out_dir = Path(base_dir), Path(delta_dir), Path(out_dir)
    base_m, delta_m = read_manifest_unverified(base_dir), read_manifest_unverified(delta_dir)
    if delta_m.kind != "delta":
        raise SnapshotRejected(RejectReason.MALFORMED, "not a delta snapshot")
    if (delta_m.base_version, delta_m.base_manifest_sha256) != snapshot_identity(base_dir):
        raise SnapshotRejected(
            RejectReason.BASE_MISMATCH, f"delta chains to v{delta_m.base_version}, base is v{base_m.version}"
        )
    if (base_m.model_id, base_m.dim) != (delta_m.model_id, delta_m.dim):
        raise SnapshotRejected(RejectReason.MODEL_MISMATCH, "delta and base come from different models")
    try:
        added_rows = read_rows(delta_dir / ADDED_ROWS)
        removed = json.loads(read_capped(delta_dir / REMOVED, MAX_ROWS_BYTES))
        deleted = [int(x) for x in removed["labels"]]
        removed_skus = [str(s) for s in removed["skus"]]
        raw = np.fromfile(delta_dir / ADDED_VECTORS, dtype="<f4")
        items, vectors = merge_rows(
            read_rows(base_dir / ITEMS),
            read_rows(base_dir / VECTORS),
            read_rows(delta_dir / ITEMS),
            removed_skus,
            added_rows,
            deleted,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotRejected(RejectReason.MALFORMED, f"delta files unreadable: {exc}") from exc
    if raw.size != len(added_rows) * delta_m.dim:
        raise SnapshotRejected(
            RejectReason.SIZE_MISMATCH, f"{ADDED_VECTORS} does not hold {len(added_rows)} rows"
        )
    want = delta_m.extra.get("delta", {}).get("result", {})
    items_b, vectors_b = rows_bytes(items), rows_bytes(vectors)
    if want.get(ITEMS) != _sha(items_b) or want.get(VECTORS) != _sha(vectors_b):
        raise SnapshotRejected(
            RejectReason.HASH_MISMATCH, "base + delta rows differ from what the delta promises"
        )
    thumbs = [str(r["thumbnail"]) for r in items if r.get("thumbnail")]
    for thumb in thumbs:
        if thumb.startswith("/") or ".." in thumb.split("/"):
            raise SnapshotRejected(RejectReason.UNSAFE_NAME, f"thumbnail {thumb!r}")

    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / THUMBS).mkdir(parents=True)
    try:
        result = _write_applied(base_dir, delta_dir, tmp, base_m, delta_m, raw, added_rows, deleted, thumbs)
        atomic_write_bytes(tmp / ITEMS, items_b)  # before describing: the files list must cover them
        atomic_write_bytes(tmp / VECTORS, vectors_b)
        names = [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]
        result = result.model_copy(update={"files": describe_files(tmp, names)})
        atomic_write_bytes(
            tmp / MANIFEST,
            (json.dumps(result.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode(),
        )
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _write_applied(
    base_dir: Path,
    delta_dir: Path,
    tmp: Path,
    base_m: SnapshotManifest,
    delta_m: SnapshotManifest,
    raw: npt.NDArray[np.float32],
    added_rows: list[dict[str, Any]],
    deleted: list[int],
    thumbs: list[str],
) -> SnapshotManifest:
    """Index, projection and thumbnails of base + delta into ``tmp``; the result manifest (files unset)."""
    try:
        index = vindex.load(
            base_dir / INDEX, dim=base_m.dim, ef=delta_m.hnsw.ef, count=None, extra_capacity=len(added_rows)
        )
    except (vindex.IndexFileError, OSError) as exc:
        raise SnapshotRejected(RejectReason.BAD_INDEX, str(exc)) from exc
    hnsw: Any = index.raw
    try:
        if added_rows:
            vecs: npt.NDArray[np.float32] = raw.reshape(len(added_rows), delta_m.dim).astype(np.float32)
            hnsw.add_items(vecs, np.array([int(r["label"]) for r in added_rows], np.int64), num_threads=1)
        for label in deleted:
            hnsw.mark_deleted(label)
    except RuntimeError as exc:  # a deleted label the base does not hold, a label added twice
        raise SnapshotRejected(RejectReason.BAD_INDEX, f"delta does not fit its base index: {exc}") from exc
    index.save(tmp / INDEX)
    try:
        if delta_m.projection is not None:  # the delta's vectors live in its (the base's) projected space
            shutil.copyfile(delta_dir / delta_m.projection.file, tmp / delta_m.projection.file)
        for thumb in thumbs:
            src = delta_dir / thumb if (delta_dir / thumb).is_file() else base_dir / thumb
            (tmp / thumb).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / thumb)
    except OSError as exc:
        raise SnapshotRejected(RejectReason.MISSING_FILE, f"neither delta nor base holds it: {exc}") from exc
    return delta_m.model_copy(
        update={
            "kind": "full",
            "base_version": None,
            "base_manifest_sha256": None,
            "extra": {
                **delta_m.extra,
                APPLIED: {
                    "base_version": base_m.version,
                    "base_manifest_sha256": delta_m.base_manifest_sha256,
                    "manifest_sha256": manifest_sha256(delta_dir),
                },
            },
        }
    )


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished temp dir into place; an existing ``out_dir`` is replaced, never mixed."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
