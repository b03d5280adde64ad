"""`storelens deploy broker` provisions what the shipped mosquitto config expects; every login it makes is
then probed over TLS against a real broker running the shipped config on exactly those files."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cloud.deploy_cli import deploy_app
from cloud.mqtt import CloudClient, resolve
from storelens.feedback import feedback_topic
from storelens.protocol import Topics, snapshot_topic
from tests.deploy.conftest import render_config, start_broker
from tests.deploy.mqtt_peer import Peer
from tests.support.mosquitto import free_port

pytestmark = pytest.mark.integration
runner = CliRunner()
STORE, OTHER = "s042", "s043"
NOT_AUTHORIZED = 135


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(deploy_app, name="deploy")
    return app


def _provision(out: Path, *extra: str) -> tuple[int, str]:
    args = ["--store", STORE, "--kiosks", "kA,kB", "--host", "localhost", "--host", "127.0.0.1"]
    r = runner.invoke(_app(), ["deploy", "broker", *args, "--out", str(out), *extra])
    return r.exit_code, r.output


def _password(env_file: Path) -> str:
    line = next(x for x in env_file.read_text().splitlines() if x.startswith(("STORELENS_MQTT_PASSWORD=",
                                                                              "STORELENS_DASHBOARD_PASSWORD=")))
    return line.split("=", 1)[1]


@dataclass
class Provisioned:
    out: Path
    tls_port: int
    ca: Path
    passwords: dict[str, str]

    @contextmanager
    def login(self, user: str | None, password: str | None = None, client_id: str | None = None
              ) -> Iterator[Peer]:  # fmt: skip
        p = Peer("localhost", self.tls_port, client_id or f"t-{user}", username=user,
                 password=password if password is not None else self.passwords.get(user or ""),
                 tls_ca=str(self.ca)).connect()
        try:
            yield p
        finally:
            p.close()


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    tmp = tmp_path_factory.mktemp("provision")
    out = tmp / "store-s042"
    code, text = _provision(out)
    assert code == 0 and "OK store broker s042 at mqtts://localhost:8883" in text, text
    www = tmp / "www"
    www.mkdir()
    ports = {"port": free_port(), "tls_port": free_port(), "ws_port": free_port()}
    conf = render_config(tmp, pki=None, http_dir=www, etc=out / "broker" / "storelens",
                         conf=out / "broker" / "conf.d" / "storelens.conf", **ports)  # fmt: skip
    files = {"kA": "kiosks/kA/kiosk.env", "kB": "kiosks/kB/kiosk.env", "ops": "cloud/ops.env",
             "collector": "cloud/feedback.env", "dashboard": "cloud/dashboard.env"}  # fmt: skip
    pw = {user: _password(out / f) for user, f in files.items()}
    with start_broker(conf, tmp):
        yield Provisioned(out, ports["tls_port"], out / "kiosks" / "kA" / "ca.pem", pw)


def test_files_are_laid_out_for_the_runbook_with_secrets_private(provisioned: Provisioned) -> None:
    """Keys, password files and env files with passwords must not be readable by others."""
    out = provisioned.out
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    secret = ("ca/ca.key", "kiosks/kA/kiosk.env", "cloud/ops.env", "cloud/feedback.env",
              "cloud/dashboard.env")
    for f in secret:
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o600, f
    for f in ("broker/storelens/passwd", "broker/storelens/tls/server.key", "broker/storelens/acl"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o640, f
    acl = (out / "broker" / "storelens" / "acl").read_text()
    assert "@STORE@" not in acl and f"pattern write dt/storelens/{STORE}/%u/#" in acl
    assert "$7$101$" in (out / "broker" / "storelens" / "passwd").read_text()
    assert 'username = "kA"' in (out / "kiosks" / "kA" / "broker.toml").read_text()
    feedback_env = (out / "cloud" / "feedback.env").read_text()
    assert "STORELENS_STORE=s042" in feedback_env
    assert "STORELENS_BROKER=mqtts://localhost:8883" in feedback_env


def test_kiosk_login_publishes_and_reads_only_as_itself_in_its_store(provisioned: Provisioned) -> None:
    """A kiosk may write only dt/storelens/<its store>/<its id>/#, read only its commands and its store's
    broadcasts: not another kiosk's, not another store's, not `#`, whatever client id it sends."""
    a, b, a_other_store = Topics(STORE, "kA"), Topics(STORE, "kB"), Topics(OTHER, "kA")
    with provisioned.login("kA", client_id="kB+#") as ka, provisioned.login("ops") as ops:
        assert ka.publish(a.status, b'{"state":"online"}').value < 128
        forbidden = (b.status, a_other_store.status, snapshot_topic(STORE), a.desired, "homeassistant/status")
        for topic in forbidden:
            assert ka.publish(topic, b"{}").value == NOT_AUTHORIZED, topic
        ka.subscribe("#")
        assert ops.publish(b.desired, b'{"forbidden":1}').value < 128
        assert ops.publish(a_other_store.desired, b"{}").value == NOT_AUTHORIZED  # ops is this store's only
        assert ops.publish(a.desired, b'{"mine":1}').value < 128
        assert ops.publish(snapshot_topic(STORE), b'{"barrier":1}').value < 128
        assert ka.wait_for(snapshot_topic(STORE)) is not None  # barrier: everything before it was delivered
        got = {m.topic for m in ka.messages}
        assert a.desired in got and b.desired not in got and a_other_store.desired not in got, got


def test_service_logins_do_what_the_acl_grants_and_nothing_more(provisioned: Provisioned) -> None:
    """ops announces and commands but cannot speak for a kiosk; dashboard reads, never writes; collector
    reads feedback only."""
    a = Topics(STORE, "kA")
    with provisioned.login("ops") as ops, provisioned.login("dashboard") as dash, \
            provisioned.login("collector") as coll, provisioned.login("kA") as ka:  # fmt: skip
        assert ops.publish(snapshot_topic(STORE), b"{}", retain=True).value < 128
        assert ops.publish(a.status, b"{}").value == NOT_AUTHORIZED
        assert dash.publish(snapshot_topic(STORE), b"{}").value == NOT_AUTHORIZED
        assert coll.publish(feedback_topic(STORE, "kA"), b"{}").value == NOT_AUTHORIZED
        dash.subscribe(a.status)
        coll.subscribe(f"dt/storelens/{STORE}/+/events/feedback")
        coll.subscribe(a.status)
        assert ka.publish(a.status, b'{"s":1}').value < 128
        assert ka.publish(feedback_topic(STORE, "kA"), b'{"f":1}').value < 128
        assert dash.wait_for(a.status) is not None
        assert coll.wait_for(feedback_topic(STORE, "kA")) is not None
        assert coll.count(a.status) == 0  # published before the feedback: it would be here by now


def test_anonymous_and_wrong_passwords_are_refused(provisioned: Provisioned) -> None:
    """No login without its own provisioned password (another kiosk's does not do)."""
    for user, pw in ((None, None), ("kA", "wrong"), ("kA", provisioned.passwords["kB"])):
        with pytest.raises(ConnectionRefusedError), provisioned.login(user, pw):
            pass


def test_cloud_toml_from_provisioning_logs_in_as_ops(provisioned: Provisioned) -> None:
    """The generated cloud.toml + ops.env is what `catalog publish` / `fleet` read (README, runbook)."""
    cfg = provisioned.out / "cloud" / "cloud.toml"
    env = {"STORELENS_MQTT_PASSWORD": provisioned.passwords["ops"]}
    s = resolve(f"mqtts://localhost:{provisioned.tls_port}", config=cfg, environ=env)
    assert s is not None and s.username == "ops" and s.ca == provisioned.out / "cloud" / "ca.pem"
    c = CloudClient(s, client_id="t-cloud")
    c.connect(timeout_s=5)
    try:
        c.publish(snapshot_topic(STORE), b"{}", retain=False)
    finally:
        c.close()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--kiosks", "dashboard"], "service login"),
        (["--kiosks", "k+1"], "kiosk id"),
        (["--kiosks", "kA,kA"], "given twice"),
        (["--store", "s/042"], "store id"),
        (["--host", "bad host!"], "not a host name"),
        (["--templates", "/nonexistent"], "template"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra: list[str], needle: str, tmp_path: Path) -> None:
    """Provisioning a login the ACL would treat as a service, or an id with + # /, must be refused."""
    code, out = _provision(tmp_path / "o", *extra)
    assert code == 2 and out.startswith("error:") and out.strip().count("\n") == 0 and needle in out, out
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_output_is_never_overwritten(tmp_path: Path) -> None:
    """Provisioning twice into one folder would replace live credentials: refused."""
    assert _provision(tmp_path / "o")[0] == 0
    code, out = _provision(tmp_path / "o")
    assert code == 2 and "refusing to overwrite" in out
