"""Session fixtures: a real mosquitto, ../shared discovery, and a no-leaked-threads guard."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto, mosquitto_binary

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()

# Threads that libraries start once per process and keep (not ours to join).
_BACKGROUND_THREAD_PREFIXES = ("pytest_timeout", "ThreadPoolExecutor", "asyncio_", "Thread-")
_LIBRARY_DAEMONS = ("AwsEventLoop", "paho-mqtt-client-", "Dummy-", "werkzeug", "ThreadedMotoServer")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs ../shared ({p} is absent); CI has it")
    return p


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread of ours running (a stop path that does not stop)."""
    before = set(threading.enumerate())
    yield
    deadline_s = 5.0
    leaked = []
    for t in set(threading.enumerate()) - before:
        if not t.is_alive() or t.name.startswith(_LIBRARY_DAEMONS):
            continue
        t.join(timeout=deadline_s)
        if t.is_alive():
            leaked.append(t.name)
    assert not leaked, f"test leaked threads: {leaked}"


def _need_mosquitto() -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; run `make setup`")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A plain mosquitto shared by the session (anonymous, loopback)."""
    _need_mosquitto()
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A mosquitto with a plain listener plus a TLS listener that requires client certificates."""
    _need_mosquitto()
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), tls=True).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def ws_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A mosquitto with plain and websockets listeners."""
    _need_mosquitto()
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto-ws"), websockets=True).start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker private to one test, for tests that stop and restart it."""
    _need_mosquitto()
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()
