"""`make demo`: the whole StoreLens loop on one machine, on the embedded defaults.

export a model bundle -> build + sign a store snapshot from a catalog -> publish it to a local folder and
announce it on a real mosquitto -> run a kiosk over a generated video of items held up one after another
-> print the match events as an independent subscriber sees them -> summary.

With ../shared present it uses the grocery data set (catalog: iconic + train photos; held items: val
photos composited over a background with motion) and the MobileNetV2 weights; without it, a synthetic
catalog it renders itself and the seeded `tiny` model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.build import build_snapshot  # noqa: E402
from cloud.grocery import read_classes, write_grocery_catalog  # noqa: E402
from cloud.publish import publish_snapshot  # noqa: E402
from device.camera.synthetic import (  # noqa: E402
    load_item_images,
    make_scene,
    render_items,
    store_photo,
    write_video,
)
from models.export import export_model  # noqa: E402
from storelens import protocol, signing  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402

STORE, KIOSK = "store-042", "kiosk-01"
MOBILENET = "models/coral/tf2_mobilenet_v2_1.0_224_ptq.tflite"


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def grocery_inputs(shared: Path, work: Path, n_items: int) -> tuple[Path, list[tuple[Path, str]]]:
    """Catalog from iconic + train photos; held items = val photos of distinct classes."""
    root = shared / "data/grocery"
    catalog = work / "catalog.jsonl"
    n = write_grocery_catalog(root, catalog)
    say(f"catalog: {n} images of {len(read_classes(root))} grocery items (iconic + train photos)")
    names = {c.id: c.name for c in read_classes(root)}
    by_class: dict[str, Path] = {}
    for line in (root / "val.txt").read_text().splitlines():
        path, cid, _ = (s.strip() for s in line.split(","))
        by_class.setdefault(names[int(cid)], root / path.lstrip("/"))
    rng = random.Random(7)
    picked = rng.sample(sorted(by_class), min(n_items, len(by_class)))
    return catalog, [(by_class[sku], sku) for sku in picked]


def synthetic_inputs(work: Path, n_items: int) -> tuple[Path, list[tuple[Path, str]]]:
    """A rendered catalog (a pack shot and a store photo per item) and the held items drawn from it."""
    imgs = render_items(n_items, seed=3)
    (work / "items").mkdir(parents=True, exist_ok=True)
    rows, held = [], []
    for i in range(n_items):
        sku = f"SKU-{i:03d}"
        paths = []
        for v, img in enumerate((imgs[i], store_photo(imgs[i], seed=i))):
            p = work / "items" / f"{sku}-{v}.png"
            cv2.imwrite(str(p), img)
            paths.append(str(p))
        rows.append(
            {
                "sku": sku,
                "title": f"Demo item {i}",
                "price": f"{1 + i % 9}.99",
                "location": f"Aisle {1 + i % 7}",
                "images": paths,
            }
        )
        held.append((Path(paths[0]), sku))
    catalog = work / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    say(f"catalog: {n_items} rendered items (../shared absent: synthetic data)")
    return catalog, held


class EventPrinter:
    """An independent subscriber: prints each match event as the store's broker delivers it."""

    def __init__(self, port: int, titles: dict[str, str]) -> None:
        self.events: list[protocol.MatchEvent] = []
        self._titles = titles
        self._ready = threading.Event()
        self._c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-subscriber")
        self._c.on_connect = lambda c, *_a: c.subscribe(f"dt/storelens/{STORE}/+/events/match", qos=1)
        self._c.on_subscribe = lambda *_a: self._ready.set()
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("demo subscriber could not subscribe")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            ev = protocol.decode(msg.payload, protocol.MatchEvent)
        except protocol.ProtocolError as exc:
            print(f"   (ignored malformed event: {exc})")
            return
        if any(e.id == ev.id for e in self.events):
            return  # QoS 1 is at-least-once: de-duplicate by event id
        self.events.append(ev)
        if ev.matched and ev.results:
            top = ev.results[0]
            where = f" - {top.location}" if top.location else ""
            price = f" - {top.price}" if top.price else ""
            print(
                f"   event #{len(self.events)}: {top.title}{price}{where} (score {top.score:.2f}, "
                f"{ev.frames} frames, {ev.latency_ms.get('total', 0):.0f} ms)",
                flush=True,
            )
        else:
            guess = f" (best guess: {ev.results[0].title})" if ev.results else ""
            print(f"   event #{len(self.events)}: no match - ask staff{guess}", flush=True)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10, help="items held up in the generated video")
    ap.add_argument("--work", type=Path, default=REPO / "build/demo")
    ap.add_argument("--fps", type=float, default=30.0, help="camera rate the video is played at")
    args = ap.parse_args()
    shared = Path(os.environ.get("SHARED", REPO.parent / "shared"))
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.monotonic()

    use_grocery = (shared / "data/grocery").is_dir() and (shared / MOBILENET).is_file()
    say("exporting the embedding model bundle")
    bundle = work / "bundle"
    if use_grocery:
        m = export_model(str(shared / MOBILENET), bundle, precision="fp16")
    else:
        m = export_model("tiny", bundle, precision="fp16")
    print(f"   {m.name}: dim {m.dim}, model_id {m.model_id[:12]}, pretrained={m.pretrained}")

    catalog, held = (
        grocery_inputs(shared, work, args.items) if use_grocery else synthetic_inputs(work, args.items)
    )

    say("building and signing the store snapshot")
    signing.generate_keypair(work / "keys/private.pem", work / "keys/public.pem")
    key = signing.load_private_key(work / "keys/private.pem")
    res = build_snapshot(
        catalog,
        STORE,
        work / "snapshot",
        key,
        bundle=bundle,
        cache_dir=work / "cache",
        progress=sys.stderr.isatty(),
    )
    man = res.manifest
    print(f"   v{man.version}: {man.item_count} items, {man.vector_count} vectors, dim {man.dim}")

    say("starting the store broker (mosquitto) and publishing the snapshot")
    broker = Mosquitto(work / "broker", websockets=True).start()
    procs: list[subprocess.Popen[bytes]] = []
    printer = None
    dashboard = None
    try:
        pub = publish_snapshot(work / "snapshot", f"file://{work / 'store-bucket'}", broker.url)
        ann = pub.announcement
        print(f"   announced v{ann.version} on {protocol.snapshot_topic(STORE)} ({ann.size} bytes)")

        say(f"generating a video of {len(held)} items held up one after another")
        # Items fill most of the frame, as a product held up close to a kiosk camera does.
        items = load_item_images([p for p, _ in held], size=340)
        scene = make_scene(items, fps=args.fps, seed=5, item_px=340)
        video = write_video(scene, work / "held-items.avi")
        print(f"   {video} ({scene.n_frames} frames, {scene.n_frames / args.fps:.0f} s)")

        titles = {}
        for line in catalog.read_text().splitlines():
            row = json.loads(line)
            titles[row["sku"]] = row["title"]
        printer = EventPrinter(broker.port, titles)
        dashboard = _start_dashboard(broker, work)

        cfg = work / "kiosk.toml"
        cfg.write_text(_kiosk_toml(work, video, bundle, broker, args.fps))
        say("running the kiosk over the video")
        kiosk = subprocess.Popen(
            [sys.executable, "-m", "storelens", "kiosk", "run", "--config", str(cfg), "--exit-at-eof"],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=open(work / "kiosk.log", "wb"),
        )
        procs.append(kiosk)
        print(f"   kiosk screen:     http://127.0.0.1:{_screen_port(cfg)}/   (log: {work / 'kiosk.log'})")
        if dashboard is not None:
            print(f"   staff dashboard:  {dashboard.url}")
        rc = kiosk.wait(timeout=scene.n_frames / args.fps * 4 + 120)
        _wait_for(lambda: len(printer.events) >= len(held), timeout_s=10)
    finally:
        if printer is not None:
            printer.close()
        if dashboard is not None:
            dashboard.stop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        broker.stop()

    events = printer.events if printer else []
    expected = [held[h.item][1] for h in scene.schedule]
    say("summary")
    correct = in_top = 0
    for i, want in enumerate(expected):
        ev = events[i] if i < len(events) else None
        skus = [r.sku for r in ev.results] if ev else []
        ok = bool(ev and ev.matched and skus and skus[0] == want)
        correct += ok
        in_top += want in skus
        answer = "(no event)" if ev is None else (skus[0] if ev.matched and skus else "no match")
        rank = f"rank {skus.index(want) + 1}" if want in skus else "not in top-k"
        print(f"   {'ok ' if ok else '-- '} held {want:<36} answered {answer:<36} ({rank})")
    k = max((len(e.results) for e in events), default=0)
    print(f"   items held:                {len(expected)}")
    print(f"   match events received:     {len(events)} (kiosk exit code {rc})")
    print(f"   answered correctly:        {correct} of {len(expected)}")
    print(f"   right item among the top-{k}: {in_top} of {len(expected)}")
    print(f"   wall time:               {time.monotonic() - t_start:.0f} s   (work dir: {work})")
    return 0 if rc == 0 and len(events) == len(expected) else 1


def _wait_for(pred: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ev = threading.Event()
    while not pred() and time.monotonic() < deadline:  # type: ignore[operator]
        ev.wait(0.1)


def _screen_port(cfg: Path) -> int:
    import tomllib

    return int(tomllib.loads(cfg.read_text())["screen"]["port"])


def _start_dashboard(broker: Mosquitto, work: Path) -> object | None:
    try:
        from cloud.dashboard.serve import DashboardServer, PageConfig
    except ImportError:
        return None
    if not (REPO / "build/dashboard/index.html").exists():
        print("   (dashboard not built: run `make setup`)")
        return None
    cfg = PageConfig(broker_ws_url=f"ws://127.0.0.1:{broker.ws_port}", store=STORE)
    return DashboardServer("127.0.0.1", 0, cfg, snapshots_dir=work / "kiosk-state").start()


def _kiosk_toml(work: Path, video: Path, bundle: Path, broker: Mosquitto, fps: float) -> str:
    from tests.support.mosquitto import free_port

    return f"""
[kiosk]
store_id = "{STORE}"
kiosk_id = "{KIOSK}"

[camera]
source = "{video}"
fps = {fps}

[model]
bundle = "{bundle}"
cache_dir = "{work / "ov-cache"}"

[snapshots]
state_dir = "{work / "kiosk-state"}"
public_keys = ["{work / "keys/public.pem"}"]

[sync]
sources = ["{(work / "store-bucket").as_uri()}/"]

[broker]
url = "{broker.url}"

[screen]
port = {free_port()}

[outbox]
path = "{work / "outbox.sqlite"}"

[health]
interval_s = 2.0
"""


if __name__ == "__main__":
    sys.exit(main())
