"""A kiosk's updater in its own process, killed on purpose at one step (for the power-loss tests).

    python -m tests.device.update.crash_child ROOT PUBKEY DESIRED_JSON CRASH_AT SOURCE

CRASH_AT: a progress step (exit when it is reported), ``on_switch`` (inside the app's switch callback,
after the pointer was committed), ``pointer_tmp`` (a pointer temp file written, never renamed), or
``none``. SOURCE: the one allowed download source (URL prefix). Exit code 9 means it crashed where asked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from device.config import UpdateConfig
from device.generations import store as pointer_mod
from device.sync import Sources
from device.update import Updater
from storelens.protocol import DesiredRelease, Topics, UpdateProgress
from storelens.signing import load_public_key

CRASHED = 9


def main() -> int:
    root, pub, desired_json, crash_at, source = sys.argv[1:6]
    desired = DesiredRelease.model_validate_json(desired_json)

    def on_switch(embedder: Any, snap: Any) -> None:
        if crash_at == "on_switch":
            os._exit(CRASHED)

    def on_progress(p: UpdateProgress) -> None:
        if p.step == crash_at:
            os._exit(CRASHED)

    if crash_at == "pointer_tmp":
        real = getattr(pointer_mod, "atomic_write_json")  # noqa: B009

        def torn(path: Path, obj: Any) -> None:
            if obj.get("state") == "probation":
                tmp = Path(path).with_name(f".{Path(path).name}.crash.tmp")
                tmp.write_text(str(obj)[: len(str(obj)) // 2])  # half a pointer, never renamed
                os._exit(CRASHED)
            real(path, obj)

        setattr(pointer_mod, "atomic_write_json", torn)  # noqa: B010

    u = Updater(
        UpdateConfig(state_dir=Path(root), probation_s=0.2, probe_interval_s=0.02),
        Topics(desired.store, desired.kiosk),
        [load_public_key(Path(pub))],
        transport=None,
        on_switch=on_switch,
        sources=Sources([source]),
    )
    u.listeners.append(on_progress)
    u.boot()
    u.start(subscribe=False)
    u.submit(desired)
    u.idle.clear()
    done = u.idle.wait(120)
    u.stop()
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
