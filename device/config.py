"""The kiosk's one configuration tree: frozen pydantic models loaded from TOML; unknown keys are refused.

Secrets never live in the file: the MQTT password comes from ``STORELENS_MQTT_PASSWORD`` (or the variable
named by ``broker.password_env``), which systemd fills from an EnvironmentFile.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device.sync.sources import Sources

DEFAULT_PASSWORD_ENV = "STORELENS_MQTT_PASSWORD"


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KioskSection(_Section):
    store_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kiosk_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class CameraConfig(_Section):
    source: str = "0"  # "0"/"usb:0", "rtsp://...", a video file, an image folder, or "synthetic"
    fps: float | None = Field(default=None, gt=0, le=240)  # ask a USB camera for this rate; paces synthetic
    width: int | None = Field(default=None, ge=16, le=8192)
    height: int | None = Field(default=None, ge=16, le=8192)
    stall_s: float = Field(default=5.0, gt=0)  # no frame for this long -> stalled, released, reopened
    open_timeout_ms: int = Field(default=5000, ge=100)
    read_timeout_ms: int = Field(default=5000, ge=100)
    backoff_min_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    queue_size: int = Field(default=2, ge=1, le=256)  # live: keep the newest; files: back-pressure
    # "auto": drop-oldest for live sources, wait for files. "drop_oldest" on a file makes it behave like a
    # camera (a stalled pipeline then shows as counted drops instead of back-pressure: soak and fleet tests).
    overflow: Literal["auto", "drop_oldest", "wait"] = "auto"
    loop: bool = False  # replay a file source forever (demo)


class DetectionConfig(_Section):
    mode: Literal["foreground", "roi"] = "foreground"
    # Fixed region of interest as fractions (x, y, w, h) of the frame: the box in "roi" mode, and the
    # fallback when the foreground covers most of the frame (lighting jump, bumped camera).
    roi: tuple[float, float, float, float] | None = None
    work_width: int = Field(default=160, ge=32, le=1920)  # analysis resolution: cost vs small items
    fg_threshold: float = Field(default=25.0, gt=0, le=255)  # grey-level change counted as foreground
    min_area_frac: float = Field(default=0.02, gt=0, lt=1)  # smaller blobs are noise or far passers-by
    max_area_frac: float = Field(default=0.85, gt=0, le=1)  # larger: a global change, not an item
    present_frames: int = Field(default=2, ge=1)  # frames of foreground before "present"
    leave_frames: int = Field(default=3, ge=1)  # frames without foreground before "left"
    steady_frames: int = Field(default=4, ge=1)  # stable frames before "steady": latency vs false starts
    steady_iou: float = Field(default=0.8, gt=0, le=1)
    steady_diff: float = Field(default=8.0, gt=0)  # mean abs thumbnail change (grey levels) still "steady"
    change_diff: float = Field(default=30.0, gt=0)  # a shown item replaced by another without leaving
    margin_frac: float = Field(default=0.1, ge=0, le=1)  # crop margin around the box
    cooldown_frames: int = Field(default=8, ge=0)
    learn_rate: float = Field(default=0.05, gt=0, le=1)  # background adaptation while idle
    absorb_frames: int = Field(default=900, ge=1)  # an "item" shown this long is scenery: learn it
    aggregate_frames: int = Field(default=3, ge=1, le=64)  # steady crops embedded per held item
    mirror_one_frame: bool = True  # the 2nd of them embedded mirrored: a free extra view (NOTES.md)
    top_k: int = Field(default=5, ge=1, le=50)

    @model_validator(mode="after")
    def _check_roi(self) -> DetectionConfig:
        if self.roi is not None:
            x, y, w, h = self.roi
            if not (0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 - x and 0 < h <= 1 - y):
                raise ValueError("roi must be fractions (x, y, w, h) inside the frame")
        if self.mode == "roi" and self.roi is None:
            raise ValueError("mode 'roi' needs roi = [x, y, w, h]")
        return self


class ModelConfig(_Section):
    kind: Literal["openvino", "fake"] = "openvino"  # "fake": the shipped FakeEmbedder (bench, no bundle)
    bundle: Path | None = None
    cache_dir: Path | None = None
    fake_dim: int = Field(default=64, ge=1, le=4096)
    mode: Literal["latency", "throughput"] = "latency"  # one camera wants the latency hint
    max_inflight: int = Field(default=2, ge=1, le=16)  # async requests in flight: overlap vs latency
    # "overlap": search on its own thread beside the next inference; "inline": search on the detect thread
    # right after each embedding (one thread less, no hand-off). bench/pipeline.py measures both.
    pipeline: Literal["overlap", "inline"] = "overlap"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "openvino" and self.bundle is None:
            raise ValueError("model.bundle is required for kind 'openvino'")
        return self


class SnapshotConfig(_Section):
    state_dir: Path  # the generation store without [update]; with it, an old layout here is moved there
    public_keys: list[Path] = Field(min_length=1)
    subscribe: bool = True  # follow the store's retained announcement topic
    initial: Path | None = None  # a snapshot directory or archive to install at first start


class SyncConfig(_Section):
    """Where announced snapshots and desired releases may be fetched from (``device.sync.sources``).

    URL prefixes: ``file:///srv/storelens/snapshots/``, ``https://cdn.example.com/store-1/``,
    ``s3://bucket/prefix/``. Empty (the default): every announced or released URL is refused
    (``source_not_allowed``) and the kiosk serves only what it holds or ``[snapshots] initial``.
    """

    sources: list[str] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _check(self) -> SyncConfig:
        Sources(self.sources)  # ValueError naming the bad prefix
        return self


class BrokerConfig(_Section):
    transport: Literal["paho", "aws", "none"] = "paho"
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None  # defaults to the kiosk id
    username: str | None = None
    password_env: str = DEFAULT_PASSWORD_ENV
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    endpoint: str | None = None  # AWS IoT Core ATS endpoint for transport "aws"

    @model_validator(mode="after")
    def _check(self) -> BrokerConfig:
        if self.transport == "aws" and not (self.endpoint and self.cert and self.key):
            raise ValueError("transport 'aws' needs endpoint, cert and key")
        return self

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The broker password from the environment (never from the file)."""
        return (os.environ if environ is None else environ).get(self.password_env) or None

    def check_files(self) -> None:
        """ConfigError naming the first TLS file (``broker.ca``, ``cert``, ``key``) that is not readable."""
        if self.transport == "none":
            return
        for name in ("ca", "cert", "key"):
            path: Path | None = getattr(self, name)
            if path is None:
                continue
            if not path.is_file():
                raise ConfigError(f"'broker.{name}': file not found: {path}")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"'broker.{name}': file not readable: {path}")


class ScreenConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    preview_fps: float = Field(default=10.0, gt=0, le=60)
    result_hold_s: float = Field(default=8.0, gt=0)  # how long an answer stays after the item left
    # Prices as the store's shelf labels write them ("12,90 kr" for sv-SE + SEK); without a currency the
    # catalog's number is shown as it is ("12.90").
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")  # ISO 4217: SEK, EUR, USD
    locale: str = Field(default="en-US", pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # BCP 47: sv-SE


class FeedbackConfig(_Section):
    """The store-learning loop's kiosk side (storelens.feedback): opt-in per store, off by default."""

    enabled: bool = False  # publish the customer's answers with the held item's crop (README: privacy)
    max_per_hour: int = Field(default=120, ge=0)  # messages sent per rolling hour; beyond: counted, not sent
    jpeg_quality: int = Field(default=85, ge=30, le=95)  # first try; lowered until under the byte cap
    answer_timeout_s: float = Field(default=15.0, gt=0, le=600)  # no tap this long: "no answer"


class OutboxConfig(_Section):
    path: Path
    max_rows: int = Field(default=100_000, ge=1)
    max_age_s: float = Field(default=7 * 24 * 3600, gt=0)


class HealthConfig(_Section):
    # At most hourly: the dashboard and Home Assistant call a kiosk stale after a few missed reports.
    interval_s: float = Field(default=30.0, gt=0, le=3600)


class UpdateConfig(_Section):
    """Model+snapshot releases (fleet rollouts): absent, the kiosk runs its configured bundle forever."""

    state_dir: Path  # the generation store: pairs, synced snapshots, the one pointer current.json
    probation_s: float = Field(default=300.0, ge=0)  # default when the release does not say
    probe_interval_s: float = Field(default=5.0, gt=0)
    max_probation_boots: int = Field(default=2, ge=1)  # restarts in probation before the old pair returns
    compile_timeout_s: float = Field(default=120.0, gt=0)
    compile_mem_mb: int = Field(default=2048, ge=256)  # address-space limit of the compile child
    max_snapshot_mb: int = Field(default=4096, ge=1)
    min_canary_cosine: float = Field(default=0.98, gt=0, le=1)
    max_latency_factor: float = Field(default=3.0, gt=1)  # self-test: new model p50 vs old on the canaries
    # Probation: roll back when the live embed p50 exceeds this x the pre-switch p50 (plus slack_ms:
    # sub-millisecond models would otherwise fail on scheduler noise alone).
    probe_latency_factor: float = Field(default=2.0, gt=1)
    probe_latency_slack_ms: float = Field(default=20.0, ge=0)
    # A model no longer served is closed this much later at the earliest, never while an open item uses it.
    retired_close_s: float = Field(default=10.0, ge=0)
    jobs: bool = True  # transport "aws": take releases from AWS IoT Jobs as well as the desired topic
    thing_name: str | None = None  # the IoT thing for Jobs; defaults to the MQTT client id

    @property
    def compile_mem_bytes(self) -> int:
        return self.compile_mem_mb << 20

    @property
    def max_snapshot_bytes(self) -> int:
        return self.max_snapshot_mb << 20


class KioskConfig(_Section):
    """The whole tree; each component receives only its own section."""

    kiosk: KioskSection
    camera: CameraConfig = CameraConfig()
    detection: DetectionConfig = DetectionConfig()
    model: ModelConfig
    snapshots: SnapshotConfig
    sync: SyncConfig = SyncConfig()
    broker: BrokerConfig = BrokerConfig()
    screen: ScreenConfig = ScreenConfig()
    outbox: OutboxConfig
    feedback: FeedbackConfig = FeedbackConfig()
    health: HealthConfig = HealthConfig()
    update: UpdateConfig | None = None

    @model_validator(mode="after")
    def _check_login(self) -> KioskConfig:
        # The store broker binds a login to its client id and grants a kiosk only the topics of its own
        # kiosk id (deploy/mosquitto): any other username or client id would be refused every topic.
        b, kiosk_id = self.broker, self.kiosk.kiosk_id
        if b.transport == "paho" and b.username is not None:
            if b.username != kiosk_id:
                raise ValueError(f"broker.username {b.username!r} must be the kiosk id {kiosk_id!r}")
            if b.client_id not in (None, kiosk_id):
                raise ValueError(f"broker.client_id {b.client_id!r} must be the kiosk id {kiosk_id!r} "
                                 "(the store broker uses the login as client id), or left out")
        return self


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{where}'")
        elif err["type"] == "missing":
            lines.append(f"missing key '{where}'")
        else:
            lines.append(f"'{where}': {err['msg']}")
    return f"{source}: " + "; ".join(lines)


def _resolve_paths(raw: dict[str, object], base: Path) -> dict[str, object]:
    """Relative paths in the file are relative to the file's folder, not the working directory."""
    path_keys = {
        "model": ("bundle", "cache_dir"),
        "snapshots": ("state_dir", "initial", "public_keys"),
        "broker": ("ca", "cert", "key"),
        "outbox": ("path",),
        "update": ("state_dir",),
    }
    out = dict(raw)
    for section, keys in path_keys.items():
        sec = out.get(section)
        if not isinstance(sec, dict):
            continue
        sec = dict(sec)
        for key in keys:
            val = sec.get(key)
            if isinstance(val, str):
                sec[key] = str(base / val) if not Path(val).is_absolute() else val
            elif isinstance(val, list):
                sec[key] = [str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                            for v in val]
        out[section] = sec
    cam = out.get("camera")
    if isinstance(cam, dict) and isinstance(cam.get("source"), str):
        src = cam["source"]
        if "://" not in src and not src.isdigit() and not src.startswith(("usb:", "synthetic")):
            cam = dict(cam)
            cam["source"] = str(base / src) if not Path(src).is_absolute() else src
            out["camera"] = cam
    return out


def parse_config(
    raw: Mapping[str, object], *, base_dir: Path | None = None, source: str = "config"
) -> KioskConfig:
    """Validate a parsed TOML mapping; relative paths resolve against ``base_dir``."""
    data = _resolve_paths(dict(raw), base_dir) if base_dir is not None else dict(raw)
    try:
        return KioskConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc


def load_config(path: Path, *, check_files: bool = False) -> KioskConfig:
    """Read and validate a kiosk TOML file; any problem raises ConfigError naming the key.

    ``check_files``: also refuse a ``[broker]`` CA, certificate or key that does not exist (the kiosk's
    start does; the example config names paths of a provisioned kiosk).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    cfg = parse_config(raw, base_dir=path.resolve().parent, source=str(path))
    if check_files:
        try:
            cfg.broker.check_files()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return cfg
