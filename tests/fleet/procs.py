"""Real kiosk processes for fleet tests: a TOML config per kiosk, `python -m device run`, and an independent
MQTT watcher that records every kiosk's match events, health, status and update progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 30.0


def toml(cfg: dict[str, dict[str, Any]]) -> str:
    """A flat two-level TOML writer (sections of scalars and string lists)."""
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, list):
                lines.append(f"{k} = [" + ", ".join(json.dumps(str(x)) for x in v) + "]")
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                lines.append(f"{k} = {v}")
            else:
                lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


class KioskProcess:
    """One `python -m device run --config ...` with its log in ``root/kiosk.log``."""

    def __init__(self, root: Path, store: str, kiosk: str, cfg: dict[str, dict[str, Any]]) -> None:
        self.root = root
        self.name = f"{store}/{kiosk}"
        self.config = root / "kiosk.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(toml(cfg))
        self.log = root / "kiosk.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}  # a crash leaves its stacks
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "device", "run", "--config", str(self.config)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs (the broker sends the last will)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL past STOP_TIMEOUT_S. Returns the exit code (None if it was killed)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return p.returncode if p else None
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class KioskSeen:
    """What the watcher saw of one kiosk."""

    events: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # boot id -> [(seq, model)]
    dupes: int = 0
    health: dict[str, Any] | None = None
    max_dropped: int = 0
    status: dict[str, Any] | None = None
    update: dict[str, Any] | None = None
    updates: list[tuple[str, str]] = field(default_factory=list)  # (release, step) in arrival order


class FleetWatch:
    """An independent subscriber (its own connection) to every kiosk's telemetry in ``stores``."""

    def __init__(self, port: int, stores: list[str]) -> None:
        self.seen: dict[str, KioskSeen] = {}
        self._cond = threading.Condition()
        self.on_update: Callable[[str, dict[str, Any]], None] | None = None  # called on the network thread
        ready = threading.Event()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-watch")
        self._c.on_connect = lambda c, *a: c.subscribe([(f"dt/storelens/{s}/#", 1) for s in stores])
        self._c.on_subscribe = lambda *a: ready.set()
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        assert ready.wait(10), "watcher not subscribed"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 5 or not msg.payload:
            return
        name, rest = f"{parts[2]}/{parts[3]}", "/".join(parts[4:])
        m = json.loads(msg.payload)
        with self._cond:
            k = self.seen.setdefault(name, KioskSeen())
            if rest == "events/match":
                evs = k.events.setdefault(m["boot_id"], [])
                if any(s == m["seq"] for s, _ in evs):
                    k.dupes += 1
                else:
                    evs.append((int(m["seq"]), str(m["model"])))
            elif rest == "health":
                k.health = m
                k.max_dropped = max(k.max_dropped, int(m["frames_dropped"]))
            elif rest == "status":
                k.status = m
            elif rest == "update":
                k.update = m
                k.updates.append((m["release"], m["step"]))
            self._cond.notify_all()
        if rest == "update" and self.on_update is not None:
            self.on_update(name, m)

    def wait(self, pred: Callable[[dict[str, KioskSeen]], bool], timeout_s: float) -> bool:
        """Wait until ``pred(seen)`` holds (checked on every message and at least every 0.5 s)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred(self.seen):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def count(self, name: str) -> int:
        with self._cond:
            k = self.seen.get(name)
            return sum(len(v) for v in k.events.values()) if k else 0

    def gaps(self, name: str) -> dict[str, list[int]]:
        """Per boot: the sequence numbers missing below the highest one received (lost events)."""
        with self._cond:
            k = self.seen.get(name) or KioskSeen()
            out = {}
            for boot, evs in k.events.items():
                got = {s for s, _ in evs}
                missing = sorted(set(range(1, max(got) + 1)) - got)
                if missing:
                    out[boot] = missing
            return out

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()
