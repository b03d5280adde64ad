"""A kiosk simulator for the dashboard tests, run as a subprocess so a SIGKILL triggers its last will.

It speaks only storelens.protocol: retained online Status with an offline last will, retained Health,
then whatever the test writes on stdin, one JSON command per line; it answers each with "ok".

    {"cmd": "match", "title": "Oat milk", "score": 0.91, "thumbnail": "thumbs/a.jpg"}
    {"cmd": "nomatch", "score": 0.31}
    {"cmd": "health", "camera": "stalled", "age_s": 0, "outbox_dropped": 0}
    {"cmd": "alert", "kind": "snapshot_refused", "detail": "bad_signature"}
    {"cmd": "update", "release": "r2", "step": "download"}
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from storelens.protocol import (
    Alert,
    Health,
    KioskState,
    MatchEvent,
    MatchItem,
    Status,
    Topics,
    UpdateProgress,
)


def _ts(age_s: float = 0.0) -> str:
    t = datetime.now(UTC) - timedelta(seconds=age_s)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Sim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.t = Topics(args.store, args.kiosk)
        self.args = args
        self.snapshot = 7
        self.model = args.model
        self.health_kw: dict[str, Any] = {"camera": "streaming", "outbox_dropped": 0, "outbox_depth": 0}
        self.connected = threading.Event()
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"sim-{args.kiosk}")
        if args.username:
            c.username_pw_set(args.username, args.password)
        will = Status(kiosk=args.kiosk, store=args.store, state=KioskState.OFFLINE, reason="lwt")
        c.will_set(self.t.status, will.to_bytes(), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=2)
        c.on_connect = self.on_connect
        self.c = c

    def on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            print(f"refused {rc}", flush=True)
            return
        # What a real kiosk does on every (re)connect: availability first, then its last numbers.
        status = Status(kiosk=self.t.kiosk, store=self.t.store, state=KioskState.ONLINE, app="0.1.0",
                        model=self.model, snapshot=self.snapshot, camera="streaming", since=_ts())
        self.c.publish(self.t.status, status.to_bytes(), qos=1, retain=True)
        self.publish_health()
        self.connected.set()

    def publish_health(self, age_s: float = 0.0) -> None:
        h = Health(
            kiosk=self.t.kiosk, store=self.t.store, ts=_ts(age_s), uptime_s=12.0, frames_in=300,
            frames_processed=290, frames_dropped=10, fps=14.8, model=self.model, snapshot=self.snapshot,
            latency_ms={"detect": {"p50": 6.1, "p99": 11.0}, "embed": {"p50": 13.9, "p99": 21.4},
                        "search": {"p50": 0.6, "p99": 1.3}, "total": {"p50": 24.0, "p99": 38.5}},
            interval_s=self.args.health_interval_s, **self.health_kw,
        )
        self.c.publish(self.t.health, h.to_bytes(), qos=1, retain=True)

    def handle(self, cmd: dict[str, Any]) -> None:
        kind = cmd.pop("cmd")
        base: dict[str, Any] = {"kiosk": self.t.kiosk, "store": self.t.store}
        if kind in ("match", "nomatch"):
            item = MatchItem(rank=1, sku=cmd.get("sku", "SKU-" + cmd.get("title", "x")[:8]),
                             title=cmd.get("title", "Unknown item"), score=cmd.get("score", 0.9),
                             thumbnail=cmd.get("thumbnail"), location=cmd.get("location"))
            ev = MatchEvent(**base, matched=kind == "match", results=[item], threshold=0.5, frames=4,
                            model=self.model, snapshot=self.snapshot,
                            latency_ms={"total": 27.0})
            info = self.c.publish(self.t.match, ev.to_bytes(), qos=1)
        elif kind == "health":
            age_s = float(cmd.pop("age_s", 0.0))
            self.health_kw.update(cmd)
            self.publish_health(age_s)
            return
        elif kind == "alert":
            info = self.c.publish(self.t.alert, Alert(**base, **cmd).to_bytes(), qos=1)
        elif kind == "update":
            up = UpdateProgress(**base, **cmd)
            info = self.c.publish(self.t.update, up.to_bytes(), qos=1, retain=True)
        else:
            raise ValueError(kind)
        info.wait_for_publish(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--kiosk", required=True)
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--health-interval-s", type=float, default=30.0)
    p.add_argument("--model", default="mobilenetv3-emb@2")
    args = p.parse_args()
    sim = Sim(args)
    sim.c.connect("127.0.0.1", args.port, keepalive=5)
    sim.c.loop_start()
    if not sim.connected.wait(10):
        print("no connection", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            sim.handle(json.loads(line))
            print("ok", flush=True)
    sim.c.disconnect()
    sim.c.loop_stop()


if __name__ == "__main__":
    main()
