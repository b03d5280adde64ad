"""The cloud MQTT client on the shipped broker config: TLS + passwords, client certificates, wss, and one
clear error line (exit 2) for each way a connection goes wrong."""

from __future__ import annotations

import getpass
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cloud.build import BuildSpec, build_snapshot
from cloud.cli import catalog_app, fleet_app
from cloud.mqtt import BrokerError, BrokerSettings, CloudClient, resolve
from storelens import protocol
from tests.cloud.conftest import CountingEmbedder, make_catalog
from tests.deploy.conftest import PASSWORDS, STORE, StoreBroker
from tests.deploy.test_mosquitto_acl import peer
from tests.support import pki as test_pki
from tests.support.mosquitto import LOG_TO_STDERR, BrokerLog, Mosquitto, free_port, mosquitto_binary

pytestmark = pytest.mark.integration
runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(catalog_app, name="catalog")
    app.add_typer(fleet_app, name="fleet")
    return app


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    cat = make_catalog(tmp_path / "cat", n_items=4, per_item=2)
    return build_snapshot(BuildSpec(
        catalog=cat.path, store=STORE, out_dir=tmp_path / "snap", private_key=Ed25519PrivateKey.generate(),
        embedder=CountingEmbedder(), progress=False,
    )).out_dir


def _publish(snapshot: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    to = (tmp / "art").as_uri()
    r = runner.invoke(_app(), ["catalog", "publish", str(snapshot), "--to", to, *args], env=env)
    return r.exit_code, r.output


def _one_error(code: int, out: str, needle: str) -> None:
    assert code == 2, out
    assert out.strip().startswith("error:") and out.strip().count("\n") == 0, out
    assert needle in out and "Traceback" not in out, out


def test_catalog_publish_over_tls_as_ops_reaches_kiosks(
    store_broker: StoreBroker, snapshot: Path, tmp_path: Path
) -> None:
    """The issue's first failure: publish over mqtt:// with no login was refused by the shipped broker. Over
    mqtts:// as `ops`, password from the environment, the announcement must be retained for a kiosk."""
    url = f"mqtts://localhost:{store_broker.tls_port}"
    env = {"STORELENS_MQTT_PASSWORD": PASSWORDS["ops"]}
    args = ["--broker", url, "--username", "ops", "--ca", str(store_broker.ca)]
    code, out = _publish(snapshot, tmp_path, *args, env=env)
    assert code == 0 and f"announced on {url}" in out, out
    with peer(store_broker, "kA") as kiosk:
        assert kiosk.subscribe(protocol.snapshot_topic(STORE)).value < 128
        got = kiosk.wait_for(protocol.snapshot_topic(STORE))
        assert got is not None and got.retain
        assert protocol.decode(got.payload, protocol.SnapshotAnnouncement).store == STORE


def test_config_file_and_env_configure_the_broker_once(
    store_broker: StoreBroker, snapshot: Path, tmp_path: Path
) -> None:
    """`[broker]` in a config file (paths relative to it) + the password in the environment: `catalog
    publish` and `fleet status` need no broker flag; a flag still overrides the file."""
    (tmp_path / "ca.pem").write_bytes(store_broker.ca.read_bytes())
    cfg = tmp_path / "cloud.toml"
    url = f"mqtts://localhost:{store_broker.tls_port}"
    cfg.write_text(f'[broker]\nurl = "{url}"\nusername = "ops"\nca = "ca.pem"\n')
    env = {"STORELENS_CONFIG": str(cfg), "STORELENS_MQTT_PASSWORD": PASSWORDS["ops"]}
    code, out = _publish(snapshot, tmp_path, env=env)
    assert code == 0 and "announced on mqtts://localhost" in out, out
    r = runner.invoke(_app(), ["fleet", "status", "--stores", STORE], env=env)
    assert r.exit_code == 0 and "STORE" in r.output, r.output
    r = runner.invoke(_app(), ["fleet", "status", "--stores", STORE, "--broker", f"mqtts://localhost:{free_port()}"],
                      env=env)  # fmt: skip
    _one_error(r.exit_code, r.output, "cannot reach broker")


def test_refused_login_unknown_ca_wrong_port_missing_ca_are_one_line_each(
    store_broker: StoreBroker, snapshot: Path, tmp_path: Path
) -> None:
    """Each mistake a retailer makes first must say what is wrong in one line, exit 2, no traceback."""
    tls = f"mqtts://localhost:{store_broker.tls_port}"
    ca = str(store_broker.ca)
    foreign_ca = str(test_pki.TestPKI(tmp_path / "other").ca)
    pw = {"STORELENS_MQTT_PASSWORD": "wrong"}
    ok = {"STORELENS_MQTT_PASSWORD": PASSWORDS["ops"]}
    dash = {"STORELENS_MQTT_PASSWORD": PASSWORDS["dashboard"]}
    cases = [
        (["--broker", tls, "--username", "ops", "--ca", ca], pw, "refused the login as 'ops'"),
        (["--broker", tls, "--ca", ca], ok, "refused the login without a username"),
        (["--broker", tls, "--username", "ops", "--ca", foreign_ca], ok, "broker certificate not trusted"),
        (["--broker", f"mqtts://localhost:{store_broker.port}", "--username", "ops", "--ca", ca], ok,
         "TLS handshake failed"),
        (["--broker", f"mqtts://localhost:{free_port()}", "--ca", ca], ok, "connection refused"),
        (["--broker", tls, "--ca", str(tmp_path / "missing.pem")], ok, "missing.pem does not exist"),
        (["--broker", "http://localhost:1"], ok, "unsupported broker URL"),
        (["--broker", tls, "--username", "dashboard", "--ca", ca], dash,
         "refused user 'dashboard' publishing on bc/storelens/s042/snapshot"),
    ]  # fmt: skip
    for args, env, needle in cases:
        code, out = _publish(snapshot, tmp_path / "x", *args, env=env)
        _one_error(code, out, needle)


@contextmanager
def _tls_dropper() -> Iterator[int]:
    """A port that accepts, reads the ClientHello and closes: a broker dropping TLS mid-handshake."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)

    t = threading.Thread(target=serve, name="tls-dropper", daemon=True)
    t.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        srv.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        srv.close()
        t.join(5)


def test_a_broker_dropping_tls_mid_handshake_is_one_error(tmp_path: Path) -> None:
    """A TLS terminator that hangs up during the handshake must not be a traceback or a hang."""
    ca = test_pki.TestPKI(tmp_path / "pki").ca
    with _tls_dropper() as port:
        s = BrokerSettings(f"mqtts://127.0.0.1:{port}", ca=ca)
        with pytest.raises(BrokerError, match=r"TLS handshake failed|cannot reach"):
            CloudClient(s, client_id="t-drop").connect(timeout_s=5)


def test_client_certificate_logs_in_and_an_expired_or_foreign_one_is_refused(tmp_path: Path) -> None:
    """Brokers that authenticate by certificate (require_certificate, identity = username): a good cert and
    key log in with no password; an expired one, or one from another CA, is one BrokerError line."""
    broker = Mosquitto(tmp_path / "b", tls=True).start()
    try:
        assert broker.pki is not None
        url = f"mqtts://localhost:{broker.tls_port}"
        good = broker.pki.issue("ops")
        c = CloudClient(BrokerSettings(url, ca=broker.pki.ca, cert=good.cert, key=good.key), client_id="t-c")
        c.connect(timeout_s=5)
        c.publish("bc/storelens/s042/snapshot", b"{}", retain=False)
        c.close()
        expired = broker.pki.issue("old", expired=True)
        foreign = test_pki.TestPKI(tmp_path / "foreign").issue("ops")
        for pair in (expired, foreign):
            s = BrokerSettings(url, ca=broker.pki.ca, cert=pair.cert, key=pair.key)
            with pytest.raises(BrokerError, match=r"TLS handshake failed|client certificate it refuses"):
                CloudClient(s, client_id="t-bad").connect(timeout_s=3)
        plain = BrokerSettings(f"mqtt://127.0.0.1:{broker.tls_port}")
        with pytest.raises(BrokerError, match=r"before answering \(a TLS port\? use mqtts"):
            CloudClient(plain, client_id="t-plain").connect(timeout_s=3)
    finally:
        broker.stop()


def test_wss_url_connects_over_websockets_with_tls(tmp_path: Path) -> None:
    """wss://host:port/mqtt must mean MQTT over TLS websockets (the dashboard's transport, for tools)."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed")
    pki = test_pki.TestPKI(tmp_path / "pki")
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(
        f"user {getpass.getuser()}\npersistence false\nallow_anonymous true\n{LOG_TO_STDERR}\n"
        f"listener {free_port()} 127.0.0.1\n"
        f"listener {port} 127.0.0.1\nprotocol websockets\ncafile {pki.ca}\ncertfile {pki.server.cert}\n"
        f"keyfile {pki.server.key}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        BrokerLog(proc).wait_running(10)
        c = CloudClient(BrokerSettings(f"wss://localhost:{port}/mqtt", ca=pki.ca), client_id="t-wss")
        c.connect(timeout_s=5)
        c.publish("t/x", b"1")
        c.close()
        with pytest.raises(BrokerError, match="not trusted"):
            CloudClient(BrokerSettings(f"wss://localhost:{port}/mqtt"), client_id="t-2").connect(timeout_s=5)
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_resolve_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file; the password never comes from the file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[broker]\nurl = "mqtt://file:1"\nusername = "u-file"\n')
    env = {"STORELENS_CONFIG": str(cfg), "STORELENS_MQTT_USERNAME": "u-env", "STORELENS_MQTT_PASSWORD": "p"}
    s = resolve(environ=env)
    assert s is not None and (s.url, s.username, s.password) == ("mqtt://file:1", "u-env", "p")
    s = resolve("mqtt://flag:2", username="u-flag", environ=env)
    assert s is not None and (s.url, s.username, s.password) == ("mqtt://flag:2", "u-flag", "p")
    assert "p" not in repr(s)
    (tmp_path / "bad.toml").write_text("[broker]\nurll = 'x'\n")
    with pytest.raises(BrokerError, match=r"bad\.toml"):
        resolve(config=tmp_path / "bad.toml", environ={})
    assert resolve(environ={}, required=False) is None
