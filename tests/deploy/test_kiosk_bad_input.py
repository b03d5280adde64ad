"""Issue 17, bad input on the kiosk side: missing TLS files refused at config load (one line, exit 2);
refused logins and broken TLS at run time logged in one line each while the outbox keeps every event."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device.cli import kiosk_app
from device.comms import Comms, Outbox
from device.comms.paho_transport import PahoTransport
from storelens.protocol import KioskState, MatchEvent, Status, Topics
from tests.deploy.conftest import STORE, StoreBroker
from tests.deploy.mqtt_peer import Peer
from tests.support import pki as test_pki
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 15.0  # generous for a loaded 2-core box; every wait ends early on its event
_TRANSPORT_LOGGER = "device.comms.paho_transport"


class LogWatch(logging.Handler):
    """Records the transport's log records; ``wait_for`` blocks on a condition instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[logging.LogRecord]], bool], timeout_s: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.records), timeout_s)

    def errors(self) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]

    def retries(self) -> int:
        with self._cond:
            return sum("still cannot connect" in r.getMessage() for r in self.records)


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger(_TRANSPORT_LOGGER)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old)


def _event(kiosk: str, seq: int) -> bytes:
    return MatchEvent(kiosk=kiosk, store=STORE, matched=True, results=[], threshold=0.5, frames=3,
                      model="m", snapshot=1, seq=seq).to_bytes()


def _comms(transport: PahoTransport, tmp_path: Path, kiosk: str) -> tuple[Comms, Outbox, Topics]:
    topics = Topics(STORE, kiosk)
    outbox = Outbox(tmp_path / f"{kiosk}-outbox.sqlite")
    comms = Comms(transport, outbox, topics, app_version="1", connect_timeout_s=0.5)
    comms.start(Status(kiosk=kiosk, store=STORE, state=KioskState.ONLINE))
    return comms, outbox, topics


def _assert_refused_and_kept(
    transport: PahoTransport, tmp_path: Path, kiosk: str, logs: LogWatch, expect: str
) -> None:
    """Run a kiosk's Comms on ``transport``: one error line naming ``expect``, retries, no traceback,
    every event still in the outbox."""
    comms, outbox, topics = _comms(transport, tmp_path, kiosk)
    try:
        for seq in range(5):
            comms.publish_event(topics.match, _event(kiosk, seq))
        assert logs.wait_for(lambda r: any(x.levelno >= logging.ERROR for x in r)), "no error line"
        assert logs.wait_for(lambda r: logs.retries() >= 2), "the transport stopped retrying"
        errors = logs.errors()
        assert len(errors) == 1, f"one line per problem, not one per retry: {errors}"
        assert expect in errors[0].lower(), errors[0]
        assert "\n" not in errors[0]
        assert not any(r.exc_info for r in logs.records), "a traceback was logged"
        assert not comms.connected
        assert transport.last_error is not None and expect in transport.last_error.lower()
        assert comms.flush()
        assert outbox.depth == 5, "events lost while the broker refused the kiosk"
    finally:
        comms.stop(timeout_s=2.0)
        outbox.close()


# -- config load --

def _config(tmp_path: Path, missing: str) -> Path:
    tls = tmp_path / "tls"
    tls.mkdir()
    pki = test_pki.TestPKI(tls)
    pair = pki.issue("k1")
    paths = {"ca": pki.ca, "cert": pair.cert, "key": pair.key}
    cfg = tmp_path / "kiosk.toml"
    cfg.write_text(
        '[kiosk]\nstore_id = "s1"\nkiosk_id = "k1"\n'
        '[camera]\nsource = "synthetic"\n[model]\nkind = "fake"\n'
        '[snapshots]\nstate_dir = "state"\npublic_keys = ["k.pub"]\n'
        '[screen]\nenabled = false\n[outbox]\npath = "outbox.sqlite"\n'
        '[broker]\nurl = "mqtts://127.0.0.1:8883"\n'
        + "".join(f'{k} = "{p}"\n' for k, p in paths.items())
    )
    paths[missing].unlink()
    return cfg


@pytest.mark.parametrize("key", ["ca", "cert", "key"])
def test_missing_tls_file_is_one_line_and_exit_2(tmp_path: Path, key: str) -> None:
    """Guards: a kiosk config naming a missing CA/cert/key starting anyway (or dying with a traceback)."""
    cfg = _config(tmp_path, key)
    result = CliRunner().invoke(kiosk_app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"broker.{key}" in lines[0], result.stderr
    assert str(tmp_path / "tls") in lines[0], "the path is named"
    assert "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "outbox.sqlite").exists(), "the kiosk started before the config was checked"


def test_missing_ca_via_python_m_device(tmp_path: Path) -> None:
    """Guards: `python -m device run` (the systemd/Greengrass entry) printing a traceback for a missing CA."""
    cfg = _config(tmp_path, "ca")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "device", "run", "--config", str(cfg)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "broker.ca" in lines[0] and "ca.pem" in lines[0], proc.stderr


# -- run time --

def test_wrong_password_then_fixed_delivers_every_event(
    store_broker: StoreBroker, tmp_path: Path, logs: LogWatch
) -> None:
    """Guards: events lost (or a crash) while the shipped TLS broker refuses the kiosk's password, and a
    kiosk that stops retrying: once the broker takes the password, every event arrives."""
    kiosk, new_pw = "kA", "pw-kiosk-a-rotated"
    transport = PahoTransport(f"mqtts://localhost:{store_broker.tls_port}", kiosk, username=kiosk,
                              password=new_pw, ca=str(store_broker.ca), reconnect_max_s=0.2)
    watcher = Peer("127.0.0.1", store_broker.port, "dashboard", "dashboard", "pw-dashboard").connect()
    comms, outbox, topics = _comms(transport, tmp_path, kiosk)
    n, stopped = 20, False
    try:
        assert str(watcher.subscribe(topics.match)) == "Granted QoS 1"
        for seq in range(n):
            comms.publish_event(topics.match, _event(kiosk, seq))
        assert logs.wait_for(lambda r: logs.retries() >= 2), "the transport stopped retrying"
        errors = logs.errors()
        assert len(errors) == 1 and "refused" in errors[0] and "password" in errors[0], errors
        assert not any(r.exc_info for r in logs.records), "a traceback was logged"
        assert not comms.connected and transport.last_error is not None
        assert comms.flush()
        assert outbox.depth == n and watcher.count(topics.match) == 0
        # The operator fixes the credential on the broker (the runbook's password rotation): reload.
        pw = tmp_path / "passwd"
        pw.write_text(f"{kiosk}:{new_pw}\ndashboard:pw-dashboard\n")
        subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
        store_broker.proc.send_signal(signal.SIGHUP)
        assert watcher.wait_count(topics.match, n, timeout_s=WAIT_S), watcher.count(topics.match)
        seqs = sorted(MatchEvent.model_validate_json(m.payload).seq
                      for m in watcher.messages if m.topic == topics.match)
        assert seqs == list(range(n)), "every event once, none lost"
        assert transport.last_error is None and comms.connected
        comms.stop(timeout_s=WAIT_S)  # joins the drain thread: the last PUBACK is in (delivered above)
        stopped = True
        assert outbox.depth == 0, "a delivered event left in the outbox would be sent again"
    finally:
        if not stopped:
            comms.stop(timeout_s=2.0)
        outbox.close()
        watcher.close()


def test_foreign_broker_certificate(store_broker: StoreBroker, tmp_path: Path, logs: LogWatch) -> None:
    """Guards: a kiosk whose CA file is not the broker's (foreign CA) crashing or looping silently."""
    foreign = test_pki.TestPKI(tmp_path / "foreign")
    transport = PahoTransport(f"mqtts://localhost:{store_broker.tls_port}", "kA", username="kA",
                              password="pw-kiosk-a", ca=str(foreign.ca), reconnect_max_s=0.2)
    _assert_refused_and_kept(transport, tmp_path, "kA", logs, "not trusted")


@pytest.mark.parametrize("case", ["expired", "foreign"])
def test_refused_client_certificate(tls_broker: Mosquitto, tmp_path: Path, logs: LogWatch, case: str) -> None:
    """Guards: an expired client certificate, or one from another CA, ending in a traceback or silence."""
    assert tls_broker.pki is not None
    kiosk = f"k-{case}"
    issuer = tls_broker.pki if case == "expired" else test_pki.TestPKI(tmp_path / "other-ca")
    pair = issuer.issue(kiosk, expired=case == "expired")
    transport = PahoTransport(f"mqtts://localhost:{tls_broker.tls_port}", kiosk, ca=str(tls_broker.pki.ca),
                              cert=str(pair.cert), key=str(pair.key), reconnect_max_s=0.2)
    expect = "certificate expired" if case == "expired" else "refused the client certificate"
    _assert_refused_and_kept(transport, tmp_path, kiosk, logs, expect)


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_broker_dropping_tls_mid_handshake(tmp_path: Path, logs: LogWatch, reply: bytes) -> None:
    """Guards: a listener that accepts and closes (or answers garbage) during the TLS handshake crashing
    the kiosk or its outbox."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(WAIT_S)
                conn.recv(4096)  # the ClientHello: the handshake has begun
                conn.sendall(reply)

    thread = threading.Thread(target=serve, name="tls-dropper", daemon=True)
    thread.start()
    try:
        pki = test_pki.TestPKI(tmp_path / "pki")
        transport = PahoTransport(f"mqtts://127.0.0.1:{srv.getsockname()[1]}", "kA", ca=str(pki.ca),
                                  reconnect_max_s=0.2)
        _assert_refused_and_kept(transport, tmp_path, "kA", logs, "tls handshake failed")
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()
