"""Lint the Greengrass v2 recipes and deployment template (Greengrass itself cannot run here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

GG = Path(__file__).resolve().parents[2] / "deploy" / "greengrass"
RECIPES = sorted(GG.glob("*.yaml"))
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
IPC_OPS = {"aws.greengrass#PublishToIoTCore", "aws.greengrass#SubscribeToIoTCore"}
_LIFECYCLE_STEPS = {"Setenv", "Bootstrap", "Install", "Run", "Startup", "Shutdown", "Recover"}


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name} is not a mapping"
    return doc


def test_recipes_exist() -> None:
    """Both components ship: the model store and the kiosk app."""
    assert {p.name for p in RECIPES} == {"com.storelens.Model.yaml", "com.storelens.Kiosk.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_structure(path: Path) -> None:
    """Required keys, format version, semver, reverse-DNS name, lifecycle, versioned S3 artifacts."""
    r = _load(path)
    assert r["RecipeFormatVersion"] == "2020-01-25"
    assert r["ComponentName"] == path.stem and r["ComponentName"].startswith("com.storelens.")
    assert _SEMVER.match(str(r["ComponentVersion"]))
    assert r["ComponentDescription"] and r["ComponentPublisher"]
    assert r["Manifests"], "no manifests"
    for m in r["Manifests"]:
        assert m["Platform"]["os"] == "linux"
        life = m["Lifecycle"]
        assert set(life) <= _LIFECYCLE_STEPS, set(life) - _LIFECYCLE_STEPS
        assert not ({"Run", "Startup"} <= set(life)), "Run and Startup are exclusive"
        for step in life.values():
            script = step["Script"] if isinstance(step, dict) else step
            assert isinstance(script, str) and script.strip()
        for art in m.get("Artifacts", []):
            uri = art["URI"]
            assert uri.startswith("s3://"), uri
            assert f"/{r['ComponentName']}/{r['ComponentVersion']}/" in uri, "artifact path not versioned"
            if uri.endswith(".zip"):
                assert art.get("Unarchive") == "ZIP"
    for dep in (r.get("ComponentDependencies") or {}).values():
        assert dep["DependencyType"] in ("HARD", "SOFT") and dep["VersionRequirement"]


def test_kiosk_recipe_runs_the_app_and_scopes_ipc_to_its_thing() -> None:
    """Venv from the wheelhouse, `storelens kiosk run` at Startup, IPC only on the thing's own topics."""
    r = _load(GG / "com.storelens.Kiosk.yaml")
    life = r["Manifests"][0]["Lifecycle"]
    assert "{work:path}/venv" in life["Install"]["Script"] and "--no-index" in life["Install"]["Script"]
    assert "storelens kiosk run" in life["Startup"]["Script"] and "Shutdown" in life
    assert "{com.storelens.Model:artifacts:decompressedPath}" in life["Startup"]["Script"]
    assert "com.storelens.Model" in r["ComponentDependencies"]
    cfg = r["ComponentConfiguration"]["DefaultConfiguration"]
    policies = cfg["accessControl"]["aws.greengrass.ipc.mqttproxy"]
    ops_seen = set()
    for name, pol in policies.items():
        assert name.startswith("com.storelens.Kiosk:mqttproxy:")
        ops_seen.update(pol["operations"])
        assert set(pol["operations"]) <= IPC_OPS
        for res in pol["resources"]:
            assert res not in ("*", "#") and not res.startswith(("#", "+"))
            if "aws.greengrass#PublishToIoTCore" in pol["operations"]:
                assert "{iot:thingName}" in res, f"publish resource {res!r} not scoped to the thing"
            elif not res.startswith("bc/"):
                assert "{iot:thingName}" in res, f"subscribe resource {res!r} not scoped to the thing"
    assert ops_seen == IPC_OPS
    for key in re.findall(r"\{configuration:/(\w+)\}", life["Startup"]["Script"]):
        assert key in cfg, f"Startup uses configuration key {key!r} with no default"


def test_kiosk_config_template_has_every_placeholder_filled() -> None:
    """Each @PLACEHOLDER@ of kiosk.toml.in is substituted by the Startup script."""
    script = _load(GG / "com.storelens.Kiosk.yaml")["Manifests"][0]["Lifecycle"]["Startup"]["Script"]
    for ph in set(re.findall(r"@[A-Z]+@", (GG / "kiosk.toml.in").read_text())):
        assert f"s|{ph}|" in script, ph


def test_deployment_template() -> None:
    """The deployment targets a store's thing group, pins both components, rolls back on failure, and rolls
    out with abort and timeout configuration."""
    d = json.loads((GG / "deployment.template.json").read_text())
    assert d["targetArn"].startswith("arn:aws:iot:") and ":thinggroup/" in d["targetArn"]
    assert {"com.storelens.Model", "com.storelens.Kiosk"} <= set(d["components"])
    merge = json.loads(d["components"]["com.storelens.Kiosk"]["configurationUpdate"]["merge"])
    assert "storeId" in merge
    assert d["deploymentPolicies"]["failureHandlingPolicy"] == "ROLLBACK"
    job = d["iotJobConfiguration"]
    assert job["jobExecutionsRolloutConfig"]["maximumPerMinute"] >= 1
    crit = job["abortConfig"]["criteriaList"][0]
    assert crit["action"] == "CANCEL" and 0 < crit["thresholdPercentage"] <= 100
    assert job["timeoutConfig"]["inProgressTimeoutInMinutes"] >= 1
