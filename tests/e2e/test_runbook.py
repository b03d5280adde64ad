"""deploy/README.md executed: provision and install the store broker with the runbook's own shell block,
build and publish a snapshot with the cloud client over TLS as `ops`, run a kiosk whose broker login is
the provisioned one, and roll a release out to it with `storelens fleet rollout`, all through the CLI.

Only what a test machine cannot do is changed in the runbook's commands: `sudo` dropped, `/etc` under a
temporary root, `systemctl restart mosquitto` replaced by starting mosquitto on the installed files (with
test ports), `broker.s042.example` -> `localhost`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from device.camera.synthetic import make_scene, write_video
from tests.cloud.conftest import make_catalog
from tests.deploy.conftest import render_config, start_broker
from tests.deploy.mqtt_peer import Peer
from tests.fleet.helpers import item_image
from tests.support.mosquitto import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300, method="thread")]

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "deploy" / "README.md"
STORE, KIOSK = "s042", "s042-k01"
CLI_TIMEOUT_S = 180.0


def _section_block(title_prefix: str) -> str:
    """The first ```sh block of the runbook section whose heading starts with ``title_prefix``."""
    text = RUNBOOK.read_text()
    section = text.split(f"\n## {title_prefix}", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)```", section, flags=re.S)
    assert m is not None, f"no sh block in section {title_prefix!r}"
    return m.group(1)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _storelens(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "storelens", *args], cwd=cwd, env=env or _env(),
                       capture_output=True, text=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
    assert r.returncode == 0, f"storelens {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _toml(cfg: dict[str, dict[str, Any]]) -> str:
    return "".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items()) + "\n"
                   for s, vals in cfg.items())  # fmt: skip


def _dashboard_shows_kiosk_online(prov: Path, ws_port: int, tmp_path: Path) -> None:
    """`storelens dashboard serve --broker wss://{host}:9001` (README, "Staff dashboard"): real Chromium
    trusting the provisioned server key only (as a staff PC trusting the store CA would) shows the kiosk."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from bench.browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT
    from cloud.dashboard.serve import DashboardServer, PageConfig
    from tests.dashboard.conftest import STATIC, _mqtt_bundle

    bundle = _mqtt_bundle()
    if not CHROMIUM.exists() or bundle is None:
        pytest.skip("Chromium or the MQTT.js bundle is missing (`make setup`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    static = tmp_path / "static"
    shutil.copytree(STATIC, static)
    shutil.copy2(bundle, static / "mqtt.min.js")
    password = _env_file(prov / "cloud" / "dashboard.env")["STORELENS_DASHBOARD_PASSWORD"]
    cfg = PageConfig(broker_ws_url=f"wss://localhost:{ws_port}", store=STORE, username="dashboard",
                     password=password)  # fmt: skip
    chain = (prov / "broker" / "storelens" / "tls" / "server.crt").read_bytes()
    cert = x509.load_pem_x509_certificates(chain)[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    server = DashboardServer("127.0.0.1", 0, cfg, static_dir=static).start()
    try:
        with sync_api.sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
                args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={pin}"], viewport=VIEWPORT,
            )
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.goto(server.url)
                page.wait_for_selector(f'article.kiosk[data-kiosk="{KIOSK}"][data-state="online"]',
                                       timeout=20_000)  # fmt: skip
            finally:
                ctx.close()
    finally:
        server.stop()


def test_runbook_end_to_end(tmp_path: Path) -> None:
    """Each step a retailer follows in deploy/README.md, in order; the first failure of the issue (cloud
    commands refused by the shipped broker) or any drift between the runbook and the code fails here."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto not installed")
    root = tmp_path / "root"
    (root / "etc" / "mosquitto" / "conf.d").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "storelens").write_text(f"#!/bin/sh\nexec {sys.executable} -m storelens \"$@\"\n")
    (bin_dir / "storelens").chmod(0o755)

    # Section 0: provision and install the store broker, as written.
    block = _section_block("0.")
    script = (block.replace("sudo ", "").replace("/etc/", f"{root}/etc/")
              .replace("systemctl restart mosquitto", "true").replace("broker.s042.example", "localhost"))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                       env=_env(PATH=f"{bin_dir}:{os.environ['PATH']}"), timeout=CLI_TIMEOUT_S)  # fmt: skip
    assert r.returncode == 0, f"{script}\n{r.stdout}\n{r.stderr}"
    prov = work / "s042-broker"
    etc = root / "etc" / "mosquitto"
    www = tmp_path / "www"
    www.mkdir()
    ports = {"port": free_port(), "tls_port": free_port(), "ws_port": free_port()}
    conf = render_config(tmp_path, pki=None, http_dir=www, etc=etc / "storelens",
                         conf=etc / "conf.d" / "storelens.conf", **ports)  # fmt: skip
    broker = f"mqtts://localhost:{ports['tls_port']}"

    with start_broker(conf, tmp_path):
        # Section 3 prerequisites: keys, a model bundle, a catalog, a signed snapshot.
        _storelens("keys", "generate", "--out", "keys", cwd=work)
        _storelens("model", "export", "--source", "tiny", "--out", "bundle", cwd=work)
        cat = make_catalog(work / "cat", n_items=6, per_item=3)
        _storelens("catalog", "build", "--catalog", str(cat.path), "--bundle", "bundle", "--store", STORE,
                   "--out", "snapshot", "--key", "keys/private.pem", cwd=work)  # fmt: skip

        # Section 4: cloud commands configured once (cloud.toml + ops.env), over TLS as ops.
        ops_env = _env_file(prov / "cloud" / "ops.env")
        cloud_env = _env(STORELENS_CONFIG=str(prov / "cloud" / "cloud.toml"), **ops_env)
        published = work / "published"
        out = _storelens("catalog", "publish", "snapshot", "--to", published.as_uri(), "--broker", broker,
                         cwd=work, env=cloud_env)  # fmt: skip
        assert f"announced on {broker}" in out, out

        # Section 0/1: the kiosk's files from the provisioning folder, installed where the runbook says.
        kdir = prov / "kiosks" / KIOSK
        (root / "etc" / "storelens" / "tls").mkdir(parents=True)
        shutil.copyfile(kdir / "ca.pem", root / "etc" / "storelens" / "tls" / "ca.pem")
        broker_section = tomllib.loads((kdir / "broker.toml").read_text())["broker"]
        assert broker_section["username"] == KIOSK and broker_section["url"] == "mqtts://localhost:8883"
        broker_section.update(url=broker, ca=str(root / "etc" / "storelens" / "tls" / "ca.pem"))
        video = write_video(make_scene([item_image(i, 0) for i in range(3)], width=320, height=240, fps=10.0,
                                       item_px=100, seed=3), work / "clip.avi")  # fmt: skip
        home = work / "kiosk"
        releases = work / "releases"
        cfg = tomllib.loads((REPO / "deploy" / "kiosk.example.toml").read_text())
        cfg["kiosk"] = {"store_id": STORE, "kiosk_id": KIOSK}
        cfg["camera"] = {"source": str(video), "loop": True, "fps": 10.0, "overflow": "drop_oldest"}
        cfg["model"] = {"bundle": str(work / "bundle")}
        pub = str(work / "keys" / "public.pem")
        cfg["snapshots"] = {"state_dir": str(home / "snapshots"), "public_keys": [pub]}
        cfg["sync"] = {"sources": [published.as_uri() + "/", releases.as_uri() + "/"]}
        cfg["broker"] = broker_section
        cfg["screen"] = {"enabled": False}
        cfg["outbox"] = {"path": str(home / "outbox.sqlite")}
        cfg["health"] = {"interval_s": 1.0}
        cfg["update"] = {**cfg["update"], "state_dir": str(home / "update"), "probe_interval_s": 0.25}
        home.mkdir()
        (home / "kiosk.toml").write_text(_toml(cfg))
        kiosk_env = _env(**_env_file(kdir / "kiosk.env"))
        log = home / "kiosk.log"
        ops_pw = ops_env["STORELENS_MQTT_PASSWORD"]
        status = f"dt/storelens/{STORE}/{KIOSK}/status"
        with log.open("wb") as log_f:
            proc = subprocess.Popen([sys.executable, "-m", "storelens", "kiosk", "run", "--config",
                                     str(home / "kiosk.toml")], cwd=home, env=kiosk_env,
                                    stdout=log_f, stderr=subprocess.STDOUT)  # fmt: skip
        watch = Peer("localhost", ports["tls_port"], "t-watch", username="ops", password=ops_pw,
                     tls_ca=str(prov / "cloud" / "ca.pem")).connect()  # fmt: skip
        try:
            assert watch.subscribe(status).value < 128
            online_v1 = watch.wait_match(status, lambda p: json.loads(p).get("state") == "online"
                                         and json.loads(p).get("snapshot") == 1, timeout_s=120)  # fmt: skip
            assert online_v1, log.read_text()[-3000:]
            watch.close()  # one connection per login: the fleet commands below log in as ops

            # Section 3 + 4: a release, rolled out through the store broker as ops.
            out = _storelens("fleet", "release", "--bundle", "bundle", "--catalog", str(cat.path),
                             "--stores", STORE, "--key", "keys/private.pem", "--to", releases.as_uri(),
                             cwd=work)  # fmt: skip
            url = out.strip().splitlines()[1]
            out = _storelens("fleet", "status", "--stores", STORE, "--broker", broker, cwd=work,
                             env=cloud_env)
            assert KIOSK in out, out
            out = _storelens("fleet", "rollout", url, "--stores", STORE, "--broker", broker, "--canary", "1",
                             "--timeout-s", "150", "--probation-s", "2", cwd=work, env=cloud_env)  # fmt: skip
            assert out.strip().splitlines()[-1].startswith("done"), out + log.read_text()[-3000:]

            # deploy/mosquitto/README.md, "Staff dashboard": the page reads the kiosks over wss as the
            # read-only dashboard user.
            _dashboard_shows_kiosk_online(prov, ports["ws_port"], tmp_path)
        finally:
            watch.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        assert proc.returncode == 0, log.read_text()[-3000:]
