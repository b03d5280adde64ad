"""The Greengrass v2 recipes and deployment template: valid against the recipe schema, and the lifecycle
scripts really run with files laid out as the nucleus lays them out (Greengrass itself cannot run here)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.deploy.conftest import PASSWORDS, STORE, StoreBroker
from tests.deploy.gg_sandbox import Nucleus
from tests.deploy.test_mosquitto_acl import peer

REPO = Path(__file__).resolve().parents[2]
GG = REPO / "deploy" / "greengrass"
RECIPES = sorted(GG.glob("*.yaml"))
SCHEMA = json.loads((Path(__file__).parent / "data" / "greengrass-recipe.schema.json").read_text())
KIOSK = "kA"  # thing name = kiosk id = its store-broker login (deploy/mosquitto/acl)


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name} is not a mapping"
    return doc


def _life(name: str) -> dict[str, Any]:
    return dict(_load(GG / f"{name}.yaml")["Manifests"][0]["Lifecycle"])


def test_recipes_exist() -> None:
    """Both components ship: the model store and the kiosk app."""
    assert {p.name for p in RECIPES} == {"com.storelens.Model.yaml", "com.storelens.Kiosk.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_against_the_recipe_schema(path: Path) -> None:
    """A misspelled key or a bad value is silently ignored or refused at create-component-version."""
    r = _load(path)
    jsonschema.validate(r, SCHEMA)
    assert r["ComponentName"] == path.stem and r["ComponentName"].startswith("com.storelens.")
    for art in r["Manifests"][0].get("Artifacts", []):
        assert f"/{r['ComponentName']}/{r['ComponentVersion']}/" in art["URI"], "artifact path not versioned"


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["Manifests"][0]["Lifecycle"].update(Startup="true"),  # Run and Startup together
        lambda r: r["Manifests"][0]["Lifecycle"]["Install"].update(Scirpt="x"),  # misspelled key
        lambda r: r["Manifests"][0]["Artifacts"][0].update(Unarchive="TAR"),
        lambda r: r.update(ComponentVersion="1.0"),
    ],
)
def test_schema_refuses_broken_recipes(edit: Any) -> None:
    """The schema is strict enough to catch what it is there for."""
    r = _load(GG / "com.storelens.Kiosk.yaml")
    edit(r)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(r, SCHEMA)


def test_kiosk_is_a_supervised_run_process_with_no_ipc_and_the_updater_on() -> None:
    """`nohup ... &` from Startup made every deployment succeed whether the kiosk ran or not, and nothing
    restarted it: the kiosk must be the Run process itself (exec), the recipe must grant no IPC the app
    does not use, and the generated kiosk.toml must enable the updater."""
    r = _load(GG / "com.storelens.Kiosk.yaml")
    life = _life("com.storelens.Kiosk")
    assert "Run" in life and "Startup" not in life and "Shutdown" not in life
    run = life["Run"]["Script"]
    assert "exec {work:path}/venv/bin/storelens kiosk run" in run and "nohup" not in run
    assert not re.search(r"(?<!&)&(?!&)", run), "something is sent to the background"
    assert "accessControl" not in r["ComponentConfiguration"]["DefaultConfiguration"]
    assert "[update]" in (GG / "kiosk.toml.in").read_text()
    for ph in set(re.findall(r"@[A-Z]+@", (GG / "kiosk.toml.in").read_text())):
        assert f"s|{ph}|" in run, f"{ph} of kiosk.toml.in is never filled"


def test_deployment_template() -> None:
    """One store's thing group, both components pinned, rollback on failure, rollout/abort/timeout; the
    configuration it merges names keys the Kiosk recipe has."""
    d = json.loads((GG / "deployment.template.json").read_text())
    assert d["targetArn"].startswith("arn:aws:iot:") and ":thinggroup/" in d["targetArn"]
    assert {"com.storelens.Model", "com.storelens.Kiosk"} <= set(d["components"])
    merge = json.loads(d["components"]["com.storelens.Kiosk"]["configurationUpdate"]["merge"])
    defaults = _load(GG / "com.storelens.Kiosk.yaml")["ComponentConfiguration"]["DefaultConfiguration"]
    assert set(merge) <= set(defaults) and "storeId" in merge
    assert d["deploymentPolicies"]["failureHandlingPolicy"] == "ROLLBACK"
    job = d["iotJobConfiguration"]
    assert job["jobExecutionsRolloutConfig"]["maximumPerMinute"] >= 1
    crit = job["abortConfig"]["criteriaList"][0]
    assert crit["action"] == "CANCEL" and 0 < crit["thresholdPercentage"] <= 100
    assert job["timeoutConfig"]["inProgressTimeoutInMinutes"] >= 1


def _zip(out: Path, folder: Path) -> Path:
    """``folder``'s files at the root of a zip (the layout the recipes and runbook describe)."""
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240, method="thread")
def test_lifecycles_run_as_the_nucleus_runs_them(store_broker: StoreBroker, tmp_path: Path) -> None:
    """Model Install, Kiosk Install and Kiosk Run with the nucleus's layout and variables: the kiosk comes up
    on the store broker over TLS as its thing name, and SIGTERM (how the nucleus stops Run) stops it
    cleanly. A wrong artifact path, a missing file or an unknown variable fails here."""
    from models.export import export_model

    export_model("tiny", tmp_path / "bundle")
    model_zip = _zip(tmp_path / "model.zip", tmp_path / "bundle")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=120)  # fmt: skip
    wheelhouse = _zip(tmp_path / "wheelhouse.zip", wheels)
    state = tmp_path / "state"
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "public.pem").write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    env_file = tmp_path / "kiosk.env"
    env_file.write_text(f"STORELENS_MQTT_PASSWORD={PASSWORDS[KIOSK]}\n")
    gg = Nucleus(tmp_path / "greengrass" / "v2", KIOSK)
    gg.install(GG / "com.storelens.Model.yaml", {"model.zip": model_zip})
    merge = json.loads(json.loads((GG / "deployment.template.json").read_text())
                       ["components"]["com.storelens.Kiosk"]["configurationUpdate"]["merge"]
                       .replace("${STORE_ID}", STORE)
                       .replace("${STORE_BROKER}", f"mqtts://localhost:{store_broker.tls_port}")
                       .replace("${SNAPSHOT_SOURCE}", "https://cdn.example.com/s042/"))  # fmt: skip
    merge.update(caFile=str(store_broker.ca), envFile=str(env_file), stateDir=str(state))
    gg.install(GG / "com.storelens.Kiosk.yaml", {"wheelhouse.zip": wheelhouse,
                                                 "kiosk.toml.in": GG / "kiosk.toml.in"}, merge)  # fmt: skip
    gg.run("com.storelens.Model", "Install", timeout_s=30)
    # The wheelhouse here holds storelens only: pip skips dependencies, which the venv then finds in
    # this test environment's site-packages (after its own).
    gg.run("com.storelens.Kiosk", "Install", timeout_s=180, env={"PIP_NO_DEPS": "1"})
    venv_site = next((gg.work("com.storelens.Kiosk") / "venv" / "lib").glob("python3*/site-packages"))
    deps = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (venv_site / "zz-test-deps.pth").write_text(f"{deps}\n")
    log = tmp_path / "kiosk.log"
    with log.open("wb") as log_f, peer(store_broker, "ops") as ops:
        status = f"dt/storelens/{STORE}/{KIOSK}/status"
        assert ops.subscribe(status).value < 128
        proc = gg.popen("com.storelens.Kiosk", "Run", stdout=log_f, stderr=subprocess.STDOUT)
        try:
            assert ops.wait_count(status, 1, timeout_s=90), log.read_text()[-3000:]
            first = json.loads(ops.messages[-1].payload)
            assert first["state"] != "offline", first
            toml = (gg.work("com.storelens.Kiosk") / "kiosk.toml").read_text()
            assert not re.search(r"@[A-Z]+@", toml) and f'kiosk_id = "{KIOSK}"' in toml
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
            assert ops.wait_match(status, lambda p: json.loads(p)["state"] == "offline")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
