"""A real local Ray (2 CPUs, every port on loopback) per test module, stopped with nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[3]
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # plenty for these catalogs; Ray's default is 30% of RAM


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """Ray on loopback for the module; after shutdown, no process of it may remain."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs the 'scale' extra (make setup)")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        # Workers import the tests' picklable fakes from this checkout.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}},  # noqa: E501
    )
    try:
        yield
    finally:
        ray.shutdown()
        _, alive = psutil.wait_procs(_ray_children(), timeout=20)
        assert not alive, f"Ray left processes behind: {[p.pid for p in alive]}"


def _ray_children() -> list[psutil.Process]:
    """Our child processes that are Ray's (a session's mosquitto may be a child too)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out
