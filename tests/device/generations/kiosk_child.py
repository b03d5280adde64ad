"""A whole kiosk (KioskApp) switching to a release, killed on purpose at one step of the switch.

    python -m tests.device.generations.kiosk_child CONFIG_JSON DESIRED_JSON CRASH_AT
    python -m tests.device.generations.kiosk_child CONFIG_JSON snapshot:DIR CRASH_AT

CRASH_AT: ``compile`` (the compile child has run, its result not yet used), ``canary`` (the canary gate
starts), ``pointer`` (a pointer temp file half written, never renamed), ``swap`` (pointer committed, the
reference not yet swapped), ``probation`` / ``done`` (reported), or ``none``. Exit code 9: crashed there.
``snapshot:DIR``: a snapshot-only switch instead (a new snapshot of the serving model, synced), armed once
the kiosk serves; CRASH_AT ``load`` (the new index loading), ``canary``, ``pointer`` (the first pointer
write after arming, torn), ``swap``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from device.app import KioskApp
from device.config import parse_config
from device.generations import canary, serving, switcher
from device.generations import store as store_mod
from device.sync import store as sync_store_mod
from device.sync.active import ActiveSnapshot
from storelens.protocol import DesiredRelease, UpdateProgress

CRASHED = 9


def _die(*_: Any, **__: Any) -> Any:
    os._exit(CRASHED)


def arm(crash_at: str) -> None:
    """Make this process die at ``crash_at`` (patched into the product's own seams)."""
    if crash_at == "compile":
        real_compile = switcher.compile_in_child

        def compiled_then_die(*a: Any, **kw: Any) -> Any:
            real_compile(*a, **kw)
            os._exit(CRASHED)

        switcher.compile_in_child = compiled_then_die  # type: ignore[assignment]
    elif crash_at == "canary":
        canary.selftest = _die  # type: ignore[assignment]
    elif crash_at == "swap":
        serving.Serving.switch = _die  # type: ignore[method-assign]
    elif crash_at == "pointer":
        real_write = store_mod.atomic_write_json

        def torn(path: Path, obj: Any) -> None:
            if obj.get("state") == "probation":
                tmp = Path(path).with_name(f".{Path(path).name}.crash.tmp")
                tmp.write_text(str(obj)[: len(str(obj)) // 2])
                os._exit(CRASHED)
            real_write(path, obj)

        store_mod.atomic_write_json = torn  # type: ignore[assignment]


def arm_snapshot(crash_at: str) -> None:
    """Make this process die at ``crash_at`` of a snapshot-only switch (armed after boot)."""
    if crash_at == "load":
        ActiveSnapshot.load = _die  # type: ignore[method-assign,assignment]
    elif crash_at == "canary":
        ActiveSnapshot.check_canaries = _die  # type: ignore[method-assign]
    elif crash_at == "swap":
        serving.Serving.switch = _die  # type: ignore[method-assign]
        serving.Serving.on_snapshot = _die  # type: ignore[method-assign]  # committed, not swapped
    elif crash_at == "pointer":
        for mod in (store_mod, sync_store_mod):
            real_write = mod.atomic_write_json

            def torn(path: Path, obj: Any) -> None:
                tmp = Path(path).with_name(f".{Path(path).name}.crash.tmp")
                tmp.write_text(str(obj)[: len(str(obj)) // 2])
                os._exit(CRASHED)

            mod.atomic_write_json = torn  # type: ignore[assignment]
        del real_write


def snapshot_switch(cfg_json: str, snapshot: Path, crash_at: str) -> int:
    """Boot (installing the initial snapshot), boot again on it, then sync ``snapshot`` (a new snapshot of
    the serving model) with ``crash_at`` armed: ``swap`` before that boot (the sync binds its swap
    callback when it is made), the others once it serves (they would die at boot)."""
    cfg = parse_config(json.loads(cfg_json), base_dir=Path.cwd())
    first = KioskApp(cfg)
    first.start()
    first.stop()
    if crash_at == "swap":
        arm_snapshot(crash_at)
    app = KioskApp(cfg)
    app.start()
    try:
        if crash_at != "swap":
            arm_snapshot(crash_at)
        assert app.serving.sync is not None
        app.serving.sync.install(snapshot)
        return 0
    finally:
        app.stop()


def main() -> int:
    raw, desired_json, crash_at = sys.argv[1:4]
    if desired_json.startswith("snapshot:"):
        return snapshot_switch(raw, Path(desired_json.removeprefix("snapshot:")), crash_at)
    cfg = parse_config(json.loads(raw), base_dir=Path.cwd())
    desired = DesiredRelease.model_validate_json(desired_json)
    arm(crash_at)
    app = KioskApp(cfg)
    finished = threading.Event()

    def on_progress(p: UpdateProgress) -> None:
        if p.step == crash_at:
            os._exit(CRASHED)
        if p.step in ("done", "failed", "rolled_back"):
            finished.set()

    app.start()
    try:
        assert app.updater is not None
        app.updater.listeners.append(on_progress)
        app.updater.submit(desired)
        return 0 if finished.wait(120) else 3
    finally:
        app.stop()


if __name__ == "__main__":
    sys.exit(main())
