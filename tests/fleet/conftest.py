"""Session artifacts for update and fleet tests: three tiny bundles and their signed releases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fleet.helpers import export_tiny, make_catalog, make_release

STORES = ["s1", "s2"]


@dataclass
class Releases:
    key: Ed25519PrivateKey
    root: Path
    catalog: Path
    good1: Any  # model A (seed 0), sequence 10
    good2: Any  # model B (seed 2), sequence 20
    bad: Any  # constant-output model, sequence 30: fails the self-test


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    root = tmp_path_factory.mktemp("releases")
    key = Ed25519PrivateKey.generate()
    catalog = make_catalog(root / "cat", STORES)
    a = export_tiny(root / "a", seed=0)
    b = export_tiny(root / "b", seed=2)
    c = export_tiny(root / "c", constant=True)
    return Releases(
        key,
        root,
        catalog,
        make_release(root, a, catalog, STORES, key, sequence=10),
        make_release(root, b, catalog, STORES, key, sequence=20),
        make_release(root, c, catalog, STORES, key, sequence=30),
    )
