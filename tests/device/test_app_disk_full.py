"""The whole kiosk with its outbox on a full disk (real ENOSPC): the screen keeps answering, no event lost."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.comms import InMemoryTransport, Outbox
from device.config import parse_config
from storelens.protocol import Alert, MatchEvent, Topics, decode
from tests.device.test_app import setup
from tests.support.tinydisk import TinyDisk, tiny_disk

__all__ = ["setup", "tiny_disk"]  # fixtures, imported for pytest


def test_a_full_outbox_disk_keeps_the_screen_answering_and_loses_nothing(
    tmp_path: Path, tiny_disk: TinyDisk, setup: tuple[Path, Path, Path, list[np.ndarray], Ed25519PrivateKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards: the search stage raising on a full disk before the result is shown, events lost, tracebacks."""
    video, pub, snap, _, _ = setup
    outbox = tiny_disk.path / "outbox.sqlite"
    Outbox(outbox).close()  # created while there is room; the kiosk opens it on a full disk
    cfg: Any = parse_config({
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": {"source": str(video)},
        "model": {"kind": "fake", "fake_dim": 64},
        "snapshots": {"state_dir": "state", "public_keys": [str(pub)], "initial": str(snap)},
        "broker": {"transport": "none"},
        "screen": {"port": 0},
        "outbox": {"path": str(outbox)},
        "health": {"interval_s": 0.2},
    }, base_dir=tmp_path)
    transport = InMemoryTransport()
    app = KioskApp(cfg, transport=transport)
    assert app.screen is not None
    shown: list[str] = []
    show = app.screen.show_result

    def spy(result: dict[str, Any]) -> None:  # the real screen, counted
        show(result)
        shown.append(result["results"][0]["sku"])
        if len(shown) == 3:
            tiny_disk.drain()  # space returns once every item was answered on the full disk

    app.screen.show_result = spy  # type: ignore[method-assign]
    tiny_disk.fill()
    with caplog.at_level(logging.WARNING):
        app.run(exit_at_eof=True)
    topics = Topics("s1", "k1")
    assert shown == ["a", "b", "c"], "every held item answered on the screen while the disk was full"
    events = [decode(p, MatchEvent) for p in transport.messages(topics.match)]
    assert sorted(e.seq for e in events) == [1, 2, 3], "no event lost"
    kinds = [decode(p, Alert).kind for p in transport.messages(topics.alert)]
    assert "outbox_full" in kinds
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"
