"""Snapshot sync: signed index snapshots from the store's announcement topic to a swapped-in index."""

from device.sync.active import ActiveSnapshot, Hit, Item, SnapshotLoadError
from device.sync.candidate import SnapshotCandidate, SnapshotSwitch
from device.sync.download import DownloadError, fetch, redact_url
from device.sync.errors import SnapshotRefused
from device.sync.service import SnapshotSync
from device.sync.sources import SourceError, Sources
from device.sync.store import Pointer, SnapshotStore

__all__ = [
    "ActiveSnapshot",
    "DownloadError",
    "Hit",
    "Item",
    "Pointer",
    "SnapshotCandidate",
    "SnapshotLoadError",
    "SnapshotRefused",
    "SnapshotStore",
    "SnapshotSwitch",
    "SnapshotSync",
    "SourceError",
    "Sources",
    "fetch",
    "redact_url",
]
