"""The dashboard's view of local snapshots: thumbnails by version, the current catalog, model names.

Snapshot folders are found by their ``manifest.json`` (store, version), whatever they are called:
a kiosk's state root (``snapshots/v<version>-<sha12>/``, device/sync/store.py), a folder of
``catalog build`` outputs, or folders named by the bare version (older set-ups). Manifests are read
unverified: these are the operator's own local files, only shown, never loaded into an index.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from storelens import delta as d
from storelens.snapshot import MANIFEST, SnapshotRejected, read_manifest_unverified

_LOGGER = logging.getLogger(__name__)

RESCAN_S = 5.0  # a newly synced snapshot shows within 5 s; a scan reads every manifest (a few KB each)
_VERSION_DIR = re.compile(r"^v?(\d{1,15})(?:-[0-9a-f]{12})?$")


@dataclass(frozen=True, slots=True)
class CatalogItem:
    sku: str
    title: str
    thumbnail: str | None  # snapshot-relative
    version: int  # the snapshot the thumbnail is in


@dataclass(slots=True)
class _Scan:
    at: float
    dirs: dict[int, Path] = field(default_factory=dict)  # version -> folder
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # model_id -> name/version


class SnapshotShelf:
    """Snapshot folders of one store under ``root`` (rescanned at most every ``RESCAN_S``)."""

    def __init__(self, root: Path, store: str, *, rescan_s: float = RESCAN_S) -> None:
        self.root = Path(root)
        self.store = store
        self._rescan_s = rescan_s
        self._scan: _Scan | None = None

    def _candidates(self) -> list[Path]:
        out: list[Path] = []
        for base in (self.root, self.root / "snapshots"):
            if base.is_dir():
                out += [p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        return out

    def _scanned(self) -> _Scan:
        now = time.monotonic()
        if self._scan is not None and now - self._scan.at < self._rescan_s:
            return self._scan
        scan = _Scan(now)
        for p in self._candidates():
            if (p / MANIFEST).is_file():
                try:
                    m = read_manifest_unverified(p)
                except (SnapshotRejected, OSError) as exc:
                    _LOGGER.warning("snapshot folder %s: unreadable manifest (%s)", p, exc)
                    continue
                if m.store != self.store:
                    continue
                scan.dirs.setdefault(m.version, p)
                info = m.extra.get("model")
                if isinstance(info, dict) and isinstance(info.get("name"), str):
                    scan.models[m.model_id] = {"name": str(info["name"]),
                                               "version": str(info.get("version", ""))}
            else:
                match = _VERSION_DIR.match(p.name)
                if match:  # no manifest: a bare thumbnail folder named by its version
                    scan.dirs.setdefault(int(match.group(1)), p)
        self._scan = scan
        return scan

    def folder(self, version: int) -> Path | None:
        """The folder of snapshot ``version`` of this store, if present."""
        return self._scanned().dirs.get(version)

    def file(self, version: int, rel: str) -> Path | None:
        """A snapshot-relative file (a thumbnail) of ``version``, else of the nearest older version
        that has it (a delta folder holds only the thumbnails it changed); None if none has it."""
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(x in ("", ".", "..") for x in parts) or "\\" in rel:
            return None
        dirs = self._scanned().dirs
        for v in sorted((v for v in dirs if v <= version), reverse=True):
            p = dirs[v] / rel
            if p.is_file():
                return p
        return None

    def models(self) -> dict[str, dict[str, str]]:
        """model_id -> {"name", "version"} of the bundles the snapshots were built with."""
        return dict(self._scanned().models)

    def catalog(self) -> tuple[int | None, list[CatalogItem]]:
        """(version, items) of the newest snapshot: the products the store carries now."""
        dirs = self._scanned().dirs
        for v in sorted(dirs, reverse=True):
            rows = self._rows(dirs, v)
            if rows is not None:
                return v, sorted(rows.values(), key=lambda it: (it.title.casefold(), it.sku))
        return None, []

    def _rows(self, dirs: dict[int, Path], version: int, depth: int = 0) -> dict[str, CatalogItem] | None:
        p = dirs.get(version)
        if p is None or depth > 64 or not (p / d.ITEMS).is_file():
            return None
        try:
            m = read_manifest_unverified(p) if (p / MANIFEST).is_file() else None
            rows = d.read_rows(p / d.ITEMS)
        except (SnapshotRejected, OSError, ValueError) as exc:
            _LOGGER.warning("snapshot folder %s: unreadable items (%s)", p, exc)
            return None
        out: dict[str, CatalogItem] = {}
        applied = m is not None and d.APPLIED in m.extra  # a kiosk's applied delta: already merged
        if m is not None and m.kind == "delta" and not applied:
            if m.base_version is None:
                return None
            base = self._rows(dirs, m.base_version, depth + 1)
            if base is None:
                return None
            out.update(base)
            for sku in _removed_skus(p):
                out.pop(sku, None)
        for r in rows:
            sku = str(r.get("sku", ""))
            if sku:
                thumb = str(r["thumbnail"]) if r.get("thumbnail") else None
                out[sku] = CatalogItem(sku, str(r.get("title") or sku), thumb, version)
        return out


def _removed_skus(folder: Path) -> list[str]:
    try:
        raw = json.loads((folder / d.REMOVED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    skus = raw.get("skus") if isinstance(raw, dict) else None
    return [str(s) for s in skus] if isinstance(skus, list) else []
