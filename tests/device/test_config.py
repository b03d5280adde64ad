"""The kiosk config: one strict tree; unknown keys and bad values are refused with the key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
    "model": {"bundle": "model"},
    "snapshots": {"state_dir": "state", "public_keys": ["k.pub"]},
    "outbox": {"path": "outbox.sqlite"},
}


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "deploy" / "kiosk.example.toml")
    assert cfg.kiosk.kiosk_id == "kiosk-01"
    assert cfg.broker.transport == "paho"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    """A typo in the file must fail loudly, not fall back to a default silently."""
    p = tmp_path / "kiosk.toml"
    p.write_text('[kiosk]\nstore_id="s1"\nkiosk_id="k1"\n[camera]\nsourc="0"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'camera\.sourc'"):
        load_config(p)


def test_missing_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing key 'outbox'"):
        parse_config({k: v for k, v in MINIMAL.items() if k != "outbox"})
    with pytest.raises(ConfigError, match=r"kiosk\.kiosk_id"):
        parse_config({**MINIMAL, "kiosk": {"store_id": "s1", "kiosk_id": "k/#"}})
    with pytest.raises(ConfigError, match="roi"):
        parse_config({**MINIMAL, "detection": {"mode": "roi"}})
    with pytest.raises(ConfigError, match=r"screen\.currency"):  # ISO 4217 codes, not "kr"
        parse_config({**MINIMAL, "screen": {"currency": "kr"}})
    with pytest.raises(ConfigError, match=r"screen\.locale"):
        parse_config({**MINIMAL, "screen": {"locale": "sv_SE.UTF-8"}})
    cfg = parse_config({**MINIMAL, "screen": {"currency": "SEK", "locale": "sv-SE"}})
    assert (cfg.screen.currency, cfg.screen.locale) == ("SEK", "sv-SE")
    p = tmp_path / "bad.toml"
    p.write_text("[kiosk\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_relative_paths_resolve_against_the_file_and_secrets_come_from_env(tmp_path: Path) -> None:
    cfg = parse_config(MINIMAL, base_dir=tmp_path)
    assert cfg.model.bundle == tmp_path / "model"
    assert cfg.snapshots.public_keys == [tmp_path / "k.pub"]
    assert cfg.broker.password({"STORELENS_MQTT_PASSWORD": "s3cret"}) == "s3cret"
    assert cfg.broker.password({}) is None
    with pytest.raises(Exception, match="frozen"):
        cfg.kiosk.store_id = "other"  # type: ignore[misc]


def test_cli_refuses_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from device.cli import kiosk_app

    p = tmp_path / "kiosk.toml"
    p.write_text('[kiosk]\nstore_id="s1"\nkiosk_id="k1"\nbogus=1\n')
    result = CliRunner().invoke(kiosk_app, ["run", "--config", str(p)])
    assert result.exit_code == 2
    assert "unknown key 'kiosk.bogus'" in result.output


def test_cli_names_a_missing_key_or_bundle_without_a_traceback(tmp_path: Path) -> None:
    """A valid config naming a key file or model bundle that is not there: one line and exit 2 (the
    example config on a machine without /etc/storelens printed a 40-line traceback)."""
    from typer.testing import CliRunner

    from device.cli import kiosk_app
    from storelens.signing import generate_keypair

    generate_keypair(tmp_path / "private.pem", tmp_path / "public.pem")
    cfg = {**MINIMAL, "snapshots": {"state_dir": "state", "public_keys": ["missing.pub"]},
           "screen": {"port": 0}, "camera": {"source": "synthetic"}}  # fmt: skip
    p = tmp_path / "kiosk.toml"
    for key, named in (("missing.pub", "missing.pub"), ("public.pem", "model")):  # then: no bundle "model"
        cfg["snapshots"] = {"state_dir": "state", "public_keys": [key]}
        p.write_text("\n".join(f"[{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                               for k, v in cfg.items()) + "\n")  # fmt: skip
        result = CliRunner().invoke(kiosk_app, ["run", "--config", str(p), "--max-seconds", "5"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and named in result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_cli_names_a_missing_video_file_or_an_unusable_outbox_without_a_traceback(tmp_path: Path) -> None:
    """A camera source naming a video file that is not there, an outbox path that is a folder or some other
    file: one line and exit 2 (each printed a traceback; tests/adversarial/test_kiosk_config.py)."""
    from typer.testing import CliRunner

    from device.cli import kiosk_app
    from storelens.signing import generate_keypair

    generate_keypair(tmp_path / "private.pem", tmp_path / "public.pem")
    (tmp_path / "notes.txt").write_text("the store's own file, not an outbox")
    (tmp_path / "folder").mkdir()
    p = tmp_path / "kiosk.toml"
    for section, value, named in (("camera", "clip.mp4", "video file"), ("outbox", "folder", "outbox"),
                                  ("outbox", "notes.txt", "outbox")):  # fmt: skip
        cfg = {**MINIMAL, "snapshots": {"state_dir": "state", "public_keys": ["public.pem"]},
               "model": {"kind": "fake"}, "screen": {"port": 0}, "camera": {"source": "synthetic"},
               "outbox": {"path": "outbox.sqlite"}}  # fmt: skip
        cfg[section] = {"source": value} if section == "camera" else {"path": value}
        p.write_text("\n".join(f"[{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                               for k, v in cfg.items()) + "\n")  # fmt: skip
        result = CliRunner().invoke(kiosk_app, ["run", "--config", str(p), "--max-seconds", "5"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and named in result.output, result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert (tmp_path / "notes.txt").read_text() == "the store's own file, not an outbox"


def test_broker_login_must_be_the_kiosk_id() -> None:
    """The store broker binds login = client id = kiosk id; any other login would be refused every topic
    silently at run time, so the config names the mismatch at start instead."""
    ok = parse_config({**MINIMAL, "broker": {"username": "k1"}})
    assert ok.broker.username == "k1"
    with pytest.raises(ConfigError, match=r"broker\.username 'k2' must be the kiosk id 'k1'"):
        parse_config({**MINIMAL, "broker": {"username": "k2"}})
    with pytest.raises(ConfigError, match=r"broker\.client_id 'other' must be the kiosk id 'k1'"):
        parse_config({**MINIMAL, "broker": {"username": "k1", "client_id": "other"}})
    # No login (a test or demo broker without the store ACL): the client id stays free.
    assert parse_config({**MINIMAL, "broker": {"client_id": "s1-k1"}}).broker.client_id == "s1-k1"


def test_missing_broker_tls_file_is_named_at_load(tmp_path: Path) -> None:
    """Guards: a kiosk config naming a CA/cert/key that does not exist passing the load (the kiosk then
    starts and fails later, far from the cause)."""
    (tmp_path / "ca.pem").write_text("x")
    p = tmp_path / "kiosk.toml"
    body = ('[kiosk]\nstore_id="s1"\nkiosk_id="k1"\n[model]\nkind="fake"\n'
            '[snapshots]\nstate_dir="st"\npublic_keys=["k.pub"]\n[outbox]\npath="o.db"\n')
    p.write_text(body + '[broker]\nurl="mqtts://h:8883"\nca="ca.pem"\ncert="tls/k1.crt"\n')
    with pytest.raises(ConfigError, match=r"'broker\.cert': file not found: .*tls/k1\.crt") as info:
        load_config(p, check_files=True)
    assert "\n" not in str(info.value) and str(p) in str(info.value)
    assert load_config(p).broker.cert == tmp_path / "tls" / "k1.crt", "a plain load only validates"
    p.write_text(body + '[broker]\ntransport="none"\ncert="tls/k1.crt"\n')
    assert load_config(p, check_files=True).broker.transport == "none", "an offline kiosk needs no files"
