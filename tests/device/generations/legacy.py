"""The kiosk state dirs as the code before the one generation store wrote them (captured from a kiosk
running f54704b: configured model, initial full v1, then delta d2 synced and applied), written here by
hand so a field upgrade can be tested after that code is gone::

    <[snapshots] state_dir>/active.json        {"active": name, "previous": name|null,
                                                "highest_seen": [version, manifest sha256]}
    <[snapshots] state_dir>/snapshots/v<N>-<sha12>/   sha12: the signed manifest's (a delta's for an
                                                applied one, which holds proof/root + proof/v<N>)
    <[snapshots] state_dir>/staging/, downloads/
    <[snapshots] state_dir>/models/<model_id[:16]>/   the same layout, per released model's sync
    <[update] state_dir>/current.json          the generation pointer (generation 0: empty paths)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from storelens.delta import apply_delta
from storelens.snapshot import manifest_sha256, read_manifest_unverified


def name_of(snapshot: Path) -> str:
    """The folder name the old sync gave a signed snapshot (full or delta)."""
    return f"v{read_manifest_unverified(snapshot).version}-{manifest_sha256(snapshot)[:12]}"


def write_sync_state(state: Path, full: Path, delta: Path | None) -> tuple[str, str | None]:
    """The old sync's folder after installing ``full`` then (optionally) applying ``delta`` onto it.
    Returns (active name, previous name)."""
    for d in ("snapshots", "staging", "downloads"):
        (state / d).mkdir(parents=True, exist_ok=True)
    full_name = name_of(full)
    shutil.copytree(full, state / "snapshots" / full_name)
    active, previous, seen = full_name, None, full
    if delta is not None:
        applied = state / "snapshots" / name_of(delta)
        apply_delta(full, delta, applied)
        shutil.copytree(full, applied / "proof" / "root")
        shutil.copytree(delta, applied / "proof" / f"v{read_manifest_unverified(delta).version}")
        active, previous, seen = applied.name, full_name, delta
    highest = [read_manifest_unverified(seen).version, manifest_sha256(seen)]
    pointer = {"active": active, "highest_seen": highest, "previous": previous}
    (state / "active.json").write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")
    return active, previous


def write_update_pointer(update: Path, model_id: str, snapshot_version: int) -> None:
    """The generation pointer naming generation 0 (the configured model) with the snapshot it served."""
    update.mkdir(parents=True, exist_ok=True)
    for d in ("bundles", "snapshots", "staging"):
        (update / d).mkdir(exist_ok=True)
    current = {"bundle": "", "model_id": model_id, "release": "(configured)", "sequence": 0,
               "snapshot": "", "snapshot_version": snapshot_version}
    pointer = {"current": current, "failed": [], "highest_sequence": 0, "previous": None,
               "probation_boots": 0, "state": "stable"}
    (update / "current.json").write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")
