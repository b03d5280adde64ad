"""deploy/systemd units: systemd's own verifier accepts them, and their command lines parse."""

from __future__ import annotations

import configparser
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


def test_feedback_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """A unit systemd warns about (unknown key, wrong section, bad value) would be half-ignored on install."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = (UNITS / "storelens-feedback.service").read_text()
    # Only what the test machine lacks is swapped: the installed console script and the env file.
    text = text.replace("/opt/storelens/.venv/bin/storelens", sys.executable)
    text = text.replace("EnvironmentFile=/etc/storelens/feedback.env", "EnvironmentFile=-/nonexistent.env")
    unit = tmp_path / "storelens-feedback.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_feedback_unit_is_hardened_like_the_kiosk_and_keeps_secrets_off_the_command_line() -> None:
    """The collector handles customer photos: it must be at least as locked down as the kiosk, and the
    broker password must come from the environment file, never from ExecStart."""
    kiosk, fb = _service(UNITS / "storelens-kiosk.service"), _service(UNITS / "storelens-feedback.service")
    for key in HARDENING:
        assert fb.get(key) == kiosk.get(key), key
    assert fb["User"] != "root" and fb["PrivateDevices"] == "yes" and fb["CapabilityBoundingSet"] == ""
    assert "password" not in fb["ExecStart"].lower()
    assert fb["KillSignal"] == "SIGTERM" and fb["Restart"] == "on-failure"


def test_feedback_unit_command_line_parses() -> None:
    """A flag renamed in the CLI but not in the unit would make the service exit 2 on every start."""
    from cloud.cli import feedback_app

    argv = shlex.split(_service(UNITS / "storelens-feedback.service")["ExecStart"])
    assert argv[1:3] == ["feedback", "collect"], argv
    args = [a.replace("${STORELENS_STORE}", "s042").replace("${STORELENS_BROKER}", "mqtts://b:8883")
            for a in argv[3:]]  # fmt: skip
    app = typer.Typer()
    app.add_typer(feedback_app, name="feedback")
    root: Any = typer.main.get_command(app)  # typer's own click classes: reached by name
    sub = root.commands["feedback"].commands["collect"]
    ctx = sub.make_context("collect", args)
    assert ctx.params["store"] == "s042" and ctx.params["username"] == "collector"
    assert str(ctx.params["feedback_dir"]) == "/var/lib/storelens-feedback"
