"""The deploy/mosquitto config rendered with test ports and paths, started on Debian's mosquitto."""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mosquitto import LOG_TO_STDERR, BrokerLog, free_port, mosquitto_binary
from tests.support.pki import TestPKI

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
STORE = "s042"
# Kiosk logins are kiosk ids of STORE (the ACL is installed with @STORE@ replaced, as the runbook says).
PASSWORDS = {
    "kA": "pw-kiosk-a",
    "kB": "pw-kiosk-b",
    "dashboard": "pw-dashboard",
    "ops": "pw-ops",
    "homeassistant": "pw-ha",
    "collector": "pw-collector",
}
_START_TIMEOUT_S = 10.0


@dataclass
class StoreBroker:
    port: int
    tls_port: int
    ws_port: int
    ca: Path
    http_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]


def install_acl(dest: Path, store: str) -> None:
    """deploy/mosquitto/acl for ``store``, made the way README.md's runbook says: sed @STORE@."""
    with dest.open("wb") as out:
        subprocess.run(["sed", f"s/@STORE@/{store}/g", str(DEPLOY / "acl")], stdout=out, check=True)


def render_config(
    tmp: Path, *, port: int, tls_port: int, ws_port: int, pki: TestPKI | None, http_dir: Path,
    etc: Path | None = None, conf: Path | None = None,
) -> str:
    """deploy/mosquitto/storelens.conf (or ``conf``) with its Debian paths and ports swapped for test ones:
    password file and ACL in ``tmp``, TLS files from ``pki``; or all of them under ``etc`` (a provisioned
    ``broker/storelens`` folder, as it would sit in /etc/mosquitto/storelens)."""
    text = (conf or DEPLOY / "storelens.conf").read_text()
    if etc is not None:
        subs = {f"/etc/mosquitto/storelens/{f}": str(etc / f)
                for f in ("passwd", "acl", "tls/ca.crt", "tls/server.crt", "tls/server.key")}  # fmt: skip
    else:
        assert pki is not None
        subs = {
            "/etc/mosquitto/storelens/passwd": str(tmp / "passwd"),
            "/etc/mosquitto/storelens/acl": str(tmp / "acl"),
            "/etc/mosquitto/storelens/tls/ca.crt": str(pki.ca),
            "/etc/mosquitto/storelens/tls/server.crt": str(pki.server.cert),
            "/etc/mosquitto/storelens/tls/server.key": str(pki.server.key),
        }
    subs["/usr/share/storelens/dashboard"] = str(http_dir)
    for old, new in subs.items():
        assert old in text, f"{old} vanished from storelens.conf; update this test"
        text = text.replace(old, new)
    text, n1 = re.subn(r"^listener 1883 127\.0\.0\.1$", f"listener {port} 127.0.0.1", text, flags=re.M)
    text, n2 = re.subn(r"^listener 8883$", f"listener {tls_port} 127.0.0.1", text, flags=re.M)
    text, n3 = re.subn(r"^listener 9001$", f"listener {ws_port} 127.0.0.1", text, flags=re.M)
    assert (n1, n2, n3) == (1, 1, 1), "listener lines changed; update this test"
    assert text.count("use_username_as_clientid true") == 3, "each listener must bind client ids to logins"
    # What Debian's main mosquitto.conf provides, test-sized; run as the invoking user (tmp is 0700).
    head = (
        f"user {getpass.getuser()}\npersistence false\n"
        f"log_dest file {tmp / 'mosquitto.log'}\nlog_type all\n{LOG_TO_STDERR}\n"
    )
    return head + text


@contextmanager
def start_broker(conf_text: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """mosquitto on ``conf_text``, stopped by PID at exit; AssertionError with its log if it fails."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed; run `make setup`")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(conf_text)
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        BrokerLog(proc).wait_running(_START_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        proc.wait(timeout=10)
        log = (tmp_path / "mosquitto.log").read_text() if (tmp_path / "mosquitto.log").exists() else ""
        raise AssertionError(f"deploy config did not start: {exc}\n{log}") from exc
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


@contextmanager
def run_store_broker(
    tmp_path: Path, passwords: dict[str, str] = PASSWORDS, acl_extra: str = ""
) -> Iterator[StoreBroker]:
    """The deploy config on real mosquitto (``acl_extra``: test-only lines appended to the installed ACL)."""
    if mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto/mosquitto_passwd not installed; run `make setup`")
    pw = tmp_path / "passwd"
    pw.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
    pw.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
    install_acl(tmp_path / "acl", STORE)
    if acl_extra:
        with (tmp_path / "acl").open("a") as f:
            f.write(acl_extra)
    http_dir = tmp_path / "www"
    http_dir.mkdir()
    (http_dir / "index.html").write_text("<!doctype html><title>StoreLens</title>storelens-dashboard")
    pki = TestPKI(tmp_path / "pki")
    ports = {"port": free_port(), "tls_port": free_port(), "ws_port": free_port()}
    with start_broker(render_config(tmp_path, pki=pki, http_dir=http_dir, **ports), tmp_path) as proc:
        yield StoreBroker(proc=proc, ca=pki.ca, http_dir=http_dir, log=tmp_path / "mosquitto.log", **ports)


@pytest.fixture
def store_broker(tmp_path: Path) -> Iterator[StoreBroker]:
    """The deploy config on real mosquitto: loopback, TLS and websockets listeners, ACL, passwords."""
    with run_store_broker(tmp_path) as sb:
        yield sb
