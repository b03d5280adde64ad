"""Replaced models are closed after a grace period, not kept open for the kiosk's whole run."""

from __future__ import annotations

import threading

from device.generations.loaded import RetiredModels


class _Closable:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def test_each_model_is_closed_once_its_grace_period_is_over() -> None:
    """A model closed at once could still be embedding an item held across the switch; one never closed
    holds its memory (50-150 MB) until the kiosk restarts."""
    now = [100.0]
    retired = RetiredModels(10.0, clock=lambda: now[0])
    a, b = _Closable(), _Closable()
    retired.retire(a)
    now[0] = 105.0
    retired.retire(b)
    now[0] = 109.9
    assert retired.close_due() == 0 and not a.closed.is_set() and len(retired) == 2
    now[0] = 110.0
    assert retired.close_due() == 1 and a.closed.is_set() and not b.closed.is_set()
    assert len(retired) == 1
    retired.close_all()
    assert b.closed.is_set() and len(retired) == 0 and retired.close_due() == 0


def test_an_embedder_without_close_or_failing_to_close_is_dropped() -> None:
    """A stand-in without close(), or a close that raises, must not stop the others from closing."""

    class _Raises:
        def close(self) -> None:
            raise RuntimeError("boom")

    retired = RetiredModels(0.0)
    ok = _Closable()
    for emb in (object(), _Raises(), ok):
        retired.retire(emb)
    assert retired.close_due() == 3 and ok.closed.is_set() and len(retired) == 0


def test_a_model_an_open_item_still_uses_waits_past_its_grace_period() -> None:
    """An item held across the swap embeds its remaining crops with the model it opened with."""
    retired = RetiredModels(0.0)
    a = _Closable()
    retired.retire(a)
    assert retired.close_due(in_use=[a]) == 0 and not a.closed.is_set()
    assert retired.close_due(in_use=[object()]) == 1 and a.closed.is_set()
