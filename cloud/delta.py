"""Delta snapshots, the cloud side: diffing a new build's rows against its base.

What a delta holds, merging rows and applying a delta live in :mod:`storelens.delta` (kiosks apply deltas
too); they are re-exported here because the build and evaluation code reach them as ``cloud.delta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from storelens.delta import (
    ADDED_ROWS,
    ADDED_VECTORS,
    INDEX,
    ITEMS,
    MAX_ROWS_BYTES,
    REMOVED,
    THUMBS,
    VECTORS,
    apply_delta,
    merge_rows,
    read_rows,
    rows_bytes,
    snapshot_identity,
    sort_items,
    sort_vectors,
)
from storelens.delta import replace_dir as _replace_dir  # cloud/build.py's name for it

__all__ = [
    "ADDED_ROWS",
    "ADDED_VECTORS",
    "INDEX",
    "ITEMS",
    "MAX_ROWS_BYTES",
    "REMOVED",
    "THUMBS",
    "VECTORS",
    "DeltaPlan",
    "_replace_dir",
    "apply_delta",
    "load_vectors_f32",
    "merge_rows",
    "plan_delta",
    "read_rows",
    "rows_bytes",
    "snapshot_identity",
    "sort_items",
    "sort_vectors",
]


@dataclass(frozen=True, slots=True)
class DeltaPlan:
    """What changed between a base's rows and a new build's rows."""

    added: list[int]  # indexes into the new build's vector rows
    added_labels: list[int]
    deleted_labels: list[int]
    changed_items: list[dict[str, Any]]
    removed_skus: list[str]
    fraction: float  # changed vectors / base vectors
    next_label: int


def plan_delta(
    base_items: list[dict[str, Any]],
    base_vectors: list[dict[str, Any]],
    new_items: list[dict[str, Any]],
    new_vectors: list[dict[str, Any]],
) -> DeltaPlan:
    """Diff by (sku, image sha256) for vectors and by whole row for items; new labels follow the base's."""
    base_key = {(str(r["sku"]), str(r["image"])): int(r["label"]) for r in base_vectors}
    new_keys = [(str(r["sku"]), str(r["image"])) for r in new_vectors]
    new_key_set = set(new_keys)
    deleted = sorted(lbl for key, lbl in base_key.items() if key not in new_key_set)
    next_label = max((int(r["label"]) for r in base_vectors), default=-1) + 1
    added: list[int] = []
    labels: list[int] = []
    for i, key in enumerate(new_keys):
        if key not in base_key:
            added.append(i)
            labels.append(next_label + len(labels))
    base_by_sku = {str(r["sku"]): r for r in base_items}
    new_skus = {str(r["sku"]) for r in new_items}
    changed = [r for r in new_items if base_by_sku.get(str(r["sku"])) != r]
    removed = sorted(s for s in base_by_sku if s not in new_skus)
    fraction = (len(added) + len(deleted)) / max(len(base_vectors), 1)
    return DeltaPlan(added, labels, deleted, changed, removed, fraction, next_label + len(labels))


def load_vectors_f32(path: Path, dim: int) -> npt.NDArray[np.float32]:
    """Read a raw little-endian float32 matrix of ``dim`` columns."""
    raw = np.fromfile(path, dtype="<f4")
    if raw.size % dim:
        raise ValueError(f"{path.name} is not a whole number of {dim}-d rows")
    return raw.reshape(-1, dim).astype(np.float32)
