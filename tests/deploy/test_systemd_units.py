"""deploy/systemd units: systemd's own verifier accepts them, and their command lines parse."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
             "ProtectKernelModules", "ProtectControlGroups", "RestrictAddressFamilies", "LockPersonality")


def _service(unit: Path) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(unit.read_text())
    return cp["Service"]


MAX_EXPOSURE = 3.5  # `systemd-analyze security`: "OK" is below 4.0; the issue asks 3.5 or lower
UNIT_NAMES = ("storelens-kiosk.service", "storelens-feedback.service", "storelens-relearn.service")


def _installed_copy(name: str, tmp_path: Path) -> Path:
    """The unit as shipped, with only what this machine lacks swapped: the console script, the env file."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = (UNITS / name).read_text().replace("/opt/storelens/.venv/bin/storelens", sys.executable)
    text = re.sub(r"^EnvironmentFile=-?(/etc/storelens/\S+)$", r"EnvironmentFile=-\1", text, flags=re.M)
    unit = tmp_path / name
    unit.write_text(text)
    return unit


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """A unit systemd warns about (unknown key, wrong section, bad value) would be half-ignored on install:
    the kiosk's StartLimitIntervalSec sat in [Service], where systemd ignores it."""
    unit = _installed_copy(name, tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_exposure_score_is_at_most_3_5(name: str, tmp_path: Path) -> None:
    """`systemd-analyze security` scored the kiosk 7.4 (MEDIUM); both services must stay at 3.5 or lower."""
    unit = _installed_copy(name, tmp_path)
    threshold = f"--threshold={int(MAX_EXPOSURE * 10)}"  # its exit code fails above this (x10 scale)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", threshold, str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE and r.returncode == 0, r.stdout


def test_kiosk_unit_is_notify_with_a_watchdog_and_start_limits_in_unit() -> None:
    """Type=simple without a watchdog left a hung camera loop hung; [Service] start limits were ignored."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    for name in UNIT_NAMES:
        cp.read_string((UNITS / name).read_text())
        assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(cp["Unit"]), name
        assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(cp["Service"]), name
        cp.clear()
    k = _service(UNITS / "storelens-kiosk.service")
    assert k["Type"] == "notify" and k["NotifyAccess"] == "main" and int(k["WatchdogSec"]) >= 10
    assert k["DevicePolicy"] == "closed" and k["DeviceAllow"] == "char-video4linux rw"
    assert k["CapabilityBoundingSet"] == "" and k["User"] != "root"


def test_kiosk_gives_up_its_stop_before_systemd_kills_it() -> None:
    """A stop hung in a native call must end with every thread's stack in the journal (the kiosk's own stop
    budget), not with systemd's silent SIGKILL at TimeoutStopSec."""
    from device.cli import STOP_BUDGET_S

    k = _service(UNITS / "storelens-kiosk.service")
    assert 0 < STOP_BUDGET_S <= float(k["TimeoutStopSec"]) - 3


def test_feedback_unit_is_hardened_like_the_kiosk_and_keeps_secrets_off_the_command_line() -> None:
    """The collector handles customer photos: it must be at least as locked down as the kiosk, and the
    broker password must come from the environment file, never from ExecStart."""
    kiosk, fb = _service(UNITS / "storelens-kiosk.service"), _service(UNITS / "storelens-feedback.service")
    for key in HARDENING:
        assert fb.get(key) == kiosk.get(key), key
    assert fb["User"] != "root" and fb["PrivateDevices"] == "yes" and fb["CapabilityBoundingSet"] == ""
    assert "password" not in fb["ExecStart"].lower()
    assert fb["KillSignal"] == "SIGTERM" and fb["Restart"] == "on-failure"


def _parsed(unit: str, command: str) -> Any:
    """The unit's ExecStart (`storelens feedback COMMAND ...`) parsed by the CLI itself, env vars filled."""
    from cloud.cli import feedback_app
    from cloud.feedback.cli import register

    register(feedback_app)
    argv = shlex.split(_service(UNITS / unit)["ExecStart"])
    assert argv[1:3] == ["feedback", command], argv
    args = [a.replace("${STORELENS_STORE}", "s042").replace("${STORELENS_BROKER}", "mqtts://b:8883")
            for a in argv[3:]]  # fmt: skip
    app = typer.Typer()
    app.add_typer(feedback_app, name="feedback")
    root: Any = typer.main.get_command(app)  # typer's own click classes: reached by name
    return root.commands["feedback"].commands[command].make_context(command, args)


def test_feedback_unit_command_line_parses() -> None:
    """A flag renamed in the CLI but not in the unit would make the service exit 2 on every start."""
    ctx = _parsed("storelens-feedback.service", "collect")
    assert ctx.params["store"] == "s042" and ctx.params["username"] == "collector"
    assert str(ctx.params["feedback_dir"]) == "/var/lib/storelens-feedback"
    # the file storelens-relearn.path watches
    watched = _unit(UNITS / "storelens-relearn.path")["Path"]["PathChanged"]
    assert str(ctx.params["relearn_request"]) == watched


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_relearn_unit_command_line_parses_and_shares_the_collectors_store() -> None:
    """The relearn must read the feedback store the collector writes, publish where the collector looks
    for known snapshots, and announce as the broker's `ops` user (the one the ACL lets announce)."""
    ctx = _parsed("storelens-relearn.service", "relearn")
    collector = shlex.split(_service(UNITS / "storelens-feedback.service")["ExecStart"])
    assert ctx.params["feedback_dir"] == collector[collector.index("--feedback-dir") + 1]
    assert ctx.params["publish_to"] == "file://" + collector[collector.index("--snapshots") + 1]
    assert ctx.params["auto_review"] and ctx.params["username"] == "ops"
    assert "ops" in (Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl").read_text()
    relearn = _service(UNITS / "storelens-relearn.service")
    fb = _service(UNITS / "storelens-feedback.service")
    for key in HARDENING:
        assert relearn.get(key) == fb.get(key), key
    assert "password" not in relearn["ExecStart"].lower() and relearn["Type"] == "oneshot"


@pytest.mark.parametrize("name", ["storelens-relearn.timer", "storelens-relearn.path"])
def test_relearn_triggers_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """The timer and the path unit, verified beside the service they start (as installed together)."""
    service = _installed_copy("storelens-relearn.service", tmp_path)
    trigger = tmp_path / name
    trigger.write_text((UNITS / name).read_text())
    assert _unit(trigger)[name.rsplit(".", 1)[1].capitalize()]["Unit"] == service.name
    r = subprocess.run(["systemd-analyze", "verify", str(trigger)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
