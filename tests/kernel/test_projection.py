"""The snapshot's projection.bin, read by both the cloud (eval) and the kiosk (every query)."""

from __future__ import annotations

import numpy as np
import pytest

from storelens.projection import Adapter


def test_round_trip_and_unit_outputs() -> None:
    rng = np.random.default_rng(0)
    a = Adapter(rng.normal(size=8).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32))
    b = Adapter.from_bytes(a.to_bytes(), 8, 3)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(a.apply(x), b.apply(x))
    np.testing.assert_allclose(np.linalg.norm(b.apply(x), axis=1), 1.0, atol=1e-6)


def test_truncated_or_poisoned_projection_refused() -> None:
    """Guards a kiosk answering every query with NaN scores from a corrupt (but signed) projection."""
    good = Adapter.identity(4).to_bytes()
    with pytest.raises(ValueError, match="expected"):
        Adapter.from_bytes(good[:-4], 4, 4)
    poisoned = bytearray(good)
    poisoned[0:4] = np.array([np.nan], "<f4").tobytes()
    with pytest.raises(ValueError, match="non-finite"):
        Adapter.from_bytes(bytes(poisoned), 4, 4)
    with pytest.raises(ValueError, match="dims"):
        Adapter.identity(4).apply(np.ones((1, 5), np.float32))
