"""`make demo`: the store teaches the kiosk, the whole StoreLens loop on one machine.

export a model bundle -> build + sign a snapshot from a one-photo-per-item catalog -> publish it to a
local folder and announce it on a real mosquitto -> round 1: a kiosk over a generated video of items held
up, a "customer" answering each "Is this it?" through the kiosk screen's POST /answer (the product truly
held when it is shown, else "Not here") -> the kiosk's feedback messages -> the feedback collector
(in-process) with the auto-review rule -> the demo, as staff member "staff", decides the rest through the
dashboard's review API -> `catalog build --feedback` (base: the first snapshot) -> published and synced to
the running kiosk -> round 2: the kiosk restarted on the same state dir (it boots on the synced snapshot)
over other photos of the same products -> before/after.

With ../shared present it uses the grocery data set (catalog: the 81 iconic photos, protocol A; held items:
two different val photos of each product, composited over a background with motion) and the MobileNetV2
weights; without it, a synthetic catalog of pack shots it renders itself (held: store-photo renderings)
and the seeded `tiny` model.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.build import BuildSpec, build_snapshot  # noqa: E402
from cloud.feedback.auto import ReviewSpace, auto_review  # noqa: E402
from cloud.feedback.collector import BrokerConfig as CollectorBroker  # noqa: E402
from cloud.feedback.collector import FeedbackCollector  # noqa: E402
from cloud.feedback.store import Decision, FeedbackStore  # noqa: E402
from cloud.feedback.verify import KnownSnapshots  # noqa: E402
from cloud.publish import publish_snapshot  # noqa: E402
from cloud.research.grocery import read_classes, write_grocery_catalog  # noqa: E402
from device.camera.synthetic import (  # noqa: E402
    load_item_images,
    make_scene,
    render_items,
    store_photo,
    write_video,
)
from models.export import export_model  # noqa: E402
from storelens import protocol, signing  # noqa: E402
from storelens.devbroker import Mosquitto  # noqa: E402
from storelens.feedback import FeedbackEvent, store_feedback_filter  # noqa: E402

STORE, KIOSK = "store-042", "kiosk-01"
MOBILENET = "models/coral/tf2_mobilenet_v2_1.0_224_ptq.tflite"


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


@dataclass(frozen=True)
class Held:
    """One product a customer holds up: round 1 shows one photo of it, round 2 a different one."""

    sku: str
    round1: Path
    round2: Path


def grocery_inputs(shared: Path, work: Path, n_items: int) -> tuple[Path, list[Held]]:
    """Catalog: the 81 iconic photos only (protocol A); held items: two different val photos of each of
    ``n_items`` classes (round 1, round 2)."""
    root = shared / "data/grocery"
    catalog = work / "catalog.jsonl"
    n = write_grocery_catalog(root, catalog, train=False)
    say(f"catalog: {n} grocery items, one studio photo each (the iconic images: protocol A)")
    names = {c.id: c.name for c in read_classes(root)}
    by_class: dict[str, list[Path]] = {}
    for line in (root / "val.txt").read_text().splitlines():
        path, cid, _ = (s.strip() for s in line.split(","))
        by_class.setdefault(names[int(cid)], []).append(root / path.lstrip("/"))
    rng = random.Random(7)
    picked = rng.sample(sorted(s for s, ps in by_class.items() if len(ps) >= 2), n_items)
    return catalog, [Held(sku, by_class[sku][0], by_class[sku][-1]) for sku in picked]


def synthetic_inputs(work: Path, n_items: int) -> tuple[Path, list[Held]]:
    """A rendered catalog of pack shots (one per item); held items: two store photos of each."""
    imgs = render_items(n_items, seed=3)
    (work / "items").mkdir(parents=True, exist_ok=True)
    rows, held = [], []
    for i in range(n_items):
        sku = f"SKU-{i:03d}"
        pack = work / "items" / f"{sku}-pack.png"
        cv2.imwrite(str(pack), imgs[i])
        photos = []
        for r, seed in ((1, i), (2, 1000 + i)):
            p = work / "items" / f"{sku}-store-{r}.png"
            cv2.imwrite(str(p), store_photo(imgs[i], seed=seed))
            photos.append(p)
        rows.append(
            {
                "sku": sku,
                "title": f"Demo item {i}",
                "price": f"{1 + i % 9}.99",
                "location": f"Aisle {1 + i % 7}",
                "images": [str(pack)],
            }
        )
        held.append(Held(sku, photos[0], photos[1]))
    catalog = work / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    say(f"catalog: {n_items} rendered items, one pack shot each (../shared absent: synthetic data)")
    return catalog, held


class EventPrinter:
    """An independent subscriber: prints each match event as the store's broker delivers it, and hands it
    to the round's customer."""

    def __init__(self, port: int) -> None:
        self.events: list[protocol.MatchEvent] = []  # this round's, de-duplicated, in arrival order
        self._seen: set[str] = set()
        self._on_event: Callable[[protocol.MatchEvent], object] | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-subscriber")
        self._c.on_connect = lambda c, *_a: c.subscribe(f"dt/storelens/{STORE}/+/events/match", qos=1)
        self._c.on_subscribe = lambda *_a: self._ready.set()
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("demo subscriber could not subscribe")

    def new_round(self, on_event: Callable[[protocol.MatchEvent], object] | None) -> None:
        with self._lock:
            self.events, self._on_event = [], on_event

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            ev = protocol.decode(bytes(msg.payload), protocol.MatchEvent)
        except protocol.ProtocolError as exc:
            print(f"   (ignored malformed event: {exc})")
            return
        with self._lock:
            if ev.id in self._seen:
                return  # QoS 1 is at-least-once: de-duplicate by event id
            self._seen.add(ev.id)
            self.events.append(ev)
            n, on_event = len(self.events), self._on_event
        if ev.matched and ev.results:
            top = ev.results[0]
            where = f" - {top.location}" if top.location else ""
            price = f" - {top.price}" if top.price else ""
            print(
                f"   event #{n} (catalog v{ev.snapshot}): {top.title}{price}{where} (score {top.score:.2f}, "
                f"{ev.frames} frames, {ev.latency_ms.get('total', 0):.0f} ms)",
                flush=True,
            )
        else:
            guess = f" (best guess: {ev.results[0].title})" if ev.results else ""
            print(f"   event #{n} (catalog v{ev.snapshot}): no match - ask staff{guess}", flush=True)
        if on_event is not None:
            on_event(ev)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


class Customer:
    """Answers "Is this it?" on the kiosk screen as a shopper would, through the screen's POST /answer: the
    product truly held when the screen shows it (result or similar item), else "Not here". A thread of its
    own, so the MQTT client's network loop never waits on HTTP."""

    def __init__(self, screen_url: str, expected: list[str]) -> None:
        self.truth: dict[str, str] = {}  # match id -> the sku truly held (for the staff's review)
        self.answers: list[str] = []
        self.url, self._expected = screen_url, expected
        self._n = 0
        self._queue: queue.Queue[protocol.MatchEvent | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="demo-customer", daemon=True)
        self._thread.start()

    def on_event(self, ev: protocol.MatchEvent) -> None:
        self._queue.put(ev)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while (ev := self._queue.get()) is not None:
            want = self._expected[self._n] if self._n < len(self._expected) else None
            self._n += 1
            if want is None:
                continue
            try:
                self._answer(ev, want)
            except (OSError, ValueError) as exc:
                print(f"   (customer could not answer {ev.id[:8]}: {exc})", flush=True)

    def _answer(self, ev: protocol.MatchEvent, want: str) -> None:
        shown = self._shown(ev.id)  # what the screen asks about: the result and its similar items
        if shown is None:
            print(f"   customer: result {ev.id[:8]} left the screen before they could answer", flush=True)
            return
        body = {"match_id": ev.id, "answer": "confirmed", "sku": want} if want in shown else {
            "match_id": ev.id, "answer": "not_here", "sku": None}
        req = urllib.request.Request(self.url + "answer", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
        self.truth[ev.id] = want
        tap = f"taps {want}" + (" (the answer)" if shown[0] == want else " (a similar item)")
        self.answers.append(body["answer"] or "")
        print(f"   customer: {tap if want in shown else 'taps Not here (not among those shown)'}", flush=True)

    def _shown(self, match_id: str, timeout_s: float = 5.0) -> list[str] | None:
        """The skus the screen offers for ``match_id`` (its event can reach us before the screen has it)."""
        poll = threading.Event()  # never set: its wait() paces the poll
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(self.url + "api/state", timeout=5) as r:
                result = json.loads(r.read()).get("result") or {}
            if result.get("id") == match_id and result.get("ask"):
                return [str(s) for s in result["ask"]["shown"]]
            poll.wait(0.05)
        return None


class Collected:
    """The in-process collector's hook: the auto rule on each stored record; counts what it did."""

    def __init__(self, space: ReviewSpace) -> None:
        self.space = space
        self.auto_approved: list[str] = []
        self.match_of: dict[str, str] = {}  # record id -> match id (the customer knows what was held)
        self._cond = threading.Condition()
        self.n = 0

    def on_stored(self, fb: FeedbackStore, rid: str, msg: FeedbackEvent) -> None:
        entry = auto_review(fb, rid, self.space)
        with self._cond:
            self.match_of[rid] = msg.match_id
            if entry is not None:
                self.auto_approved.append(rid)
            self.n += 1
            self._cond.notify_all()

    def wait(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.n >= n, timeout_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10, help="products held up in each round")
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
    titles = {}
    for line in catalog.read_text().splitlines():
        row = json.loads(line)
        titles[row["sku"]] = row["title"]

    say("building and signing the store snapshot")
    signing.generate_keypair(work / "keys/private.pem", work / "keys/public.pem")
    key = signing.load_private_key(work / "keys/private.pem")
    v1 = build_snapshot(BuildSpec(
        catalog=catalog, store=STORE, out_dir=work / "snapshot", private_key=key, bundle=bundle,
        cache_dir=work / "cache",
        progress=sys.stderr.isatty(),
    )).manifest  # fmt: skip
    print(f"   v{v1.version}: {v1.item_count} items, {v1.vector_count} vectors, dim {v1.dim}")

    say("starting the store broker (mosquitto) and publishing the snapshot")
    broker = Mosquitto(work / "broker", websockets=True).start()
    bucket = work / "store-bucket"
    kiosk: subprocess.Popen[bytes] | None = None
    printer = collector = dashboard = None
    rounds: list[list[protocol.MatchEvent]] = []
    rcs: list[int] = []
    try:
        ann = publish_snapshot(work / "snapshot", f"file://{bucket}", broker.url).announcement
        print(f"   announced v{ann.version} on {protocol.snapshot_topic(STORE)} ({ann.size} bytes)")
        fb_dir = work / "feedback"
        collected = Collected(ReviewSpace.load(work / "snapshot"))
        collector = FeedbackCollector(
            STORE, CollectorBroker(broker.url, client_id=f"storelens-feedback-{STORE}"),
            FeedbackStore(fb_dir), KnownSnapshots(STORE, snapshots_dir=bucket), on_stored=collected.on_stored,
        )  # fmt: skip
        collector.start()
        print(f"   feedback collector: {store_feedback_filter(STORE)} -> {fb_dir}")
        printer = EventPrinter(broker.port)
        staff_pw = secrets.token_urlsafe(9)
        dashboard = _start_dashboard(broker, work, fb_dir, staff_pw)

        # Round 1 keeps running after its video (it syncs the relearned snapshot live); round 2 restarts on
        # the same state dir, so it boots on the snapshot it synced, and exits at the end of its video.
        kiosk, customer, expected, limit_s = _start_round(1, held, work, bundle, broker, args.fps, printer,
                                                          dashboard, staff_pw)  # fmt: skip
        k1 = kiosk
        _wait_for(lambda: len(printer.events) >= len(expected) or k1.poll() is not None, limit_s)
        customer.close()
        rounds.append(list(printer.events))
        n_answers = len(customer.truth)
        say(f"feedback: {n_answers} answers -> the kiosk's outbox -> MQTT -> the collector")
        if not collected.wait(n_answers, 30):
            print(f"   (only {collected.n} of {n_answers} answers reached the collector)")
        print(f"   collector: {collector.summary()}")
        print(f"   auto-review (agrees with the catalog): {len(collected.auto_approved)} pre-approved")
        _review_as_staff(dashboard, staff_pw, fb_dir, collected, customer.truth, titles)

        say("relearning: a new signed snapshot with the approved store photos (catalog build --feedback)")
        res = build_snapshot(BuildSpec(
            catalog=catalog, store=STORE, out_dir=work / "snapshot-v2", private_key=key, bundle=bundle,
            base=work / "snapshot",
            cache_dir=work / "cache", progress=sys.stderr.isatty(), feedback=fb_dir,
        ))  # fmt: skip
        rep, m2, v2 = res.report, res.manifest, res.manifest.version
        fbr = rep.get("feedback", {})
        print(f"   v{v2} ({rep['kind']}): {m2.item_count} items, {m2.vector_count} vectors, "
              f"{fbr.get('store_photos', 0)} store photos of {fbr.get('products_with_store_photos', 0)} "
              "products")  # fmt: skip
        if rep.get("delta_fallback"):
            print(f"   full, not a delta, because {rep['delta_fallback']}")
        ann = publish_snapshot(work / "snapshot-v2", f"file://{bucket}", broker.url).announcement
        print(f"   published and announced v{ann.version}; waiting for the running kiosk to sync it")
        screen = customer.url
        synced = _wait_for(lambda: _screen_snapshot(screen) == v2, timeout_s=90)
        print(f"   kiosk {'now serves' if synced else 'did NOT sync'} v{v2}")
        kiosk.terminate()
        rcs.append(kiosk.wait(30))

        kiosk, customer, expected, limit_s = _start_round(2, held, work, bundle, broker, args.fps, printer,
                                                          dashboard, staff_pw)  # fmt: skip
        rcs.append(kiosk.wait(timeout=limit_s))
        _wait_for(lambda: len(printer.events) >= len(expected), timeout_s=10)
        customer.close()
        rounds.append(list(printer.events))
    finally:
        if printer is not None:
            printer.close()
        if collector is not None:
            collector.stop()
        if dashboard is not None:
            dashboard.stop()
        if kiosk is not None and kiosk.poll() is None:
            kiosk.terminate()
            kiosk.wait(10)
        broker.stop()
    return _summary(held, rounds, rcs, t_start, work)


def _start_round(
    rnd: int, held: list[Held], work: Path, bundle: Path, broker: Mosquitto, fps: float,
    printer: EventPrinter, dashboard: Any, staff_pw: str,
) -> tuple[subprocess.Popen[bytes], Customer, list[str], float]:  # fmt: skip
    """Write round ``rnd``'s video and start a kiosk over it with a customer at its screen; returns the
    kiosk, the customer, the skus held in order and how long the round may take."""
    photos = [h.round1 if rnd == 1 else h.round2 for h in held]
    other = " (other photos of the same products)" if rnd == 2 else ""
    say(f"round {rnd}: generating a video of {len(held)} items held up one after another{other}")
    # Items fill most of the frame, as a product held up close to a kiosk camera does.
    scene = make_scene(load_item_images(photos, size=340), fps=fps, seed=5 + rnd, item_px=340)
    video = write_video(scene, work / f"held-items-{rnd}.avi")
    print(f"   {video} ({scene.n_frames} frames, {scene.n_frames / fps:.0f} s)")
    expected = [held[h.item].sku for h in scene.schedule]
    cfg = work / f"kiosk-{rnd}.toml"
    cfg.write_text(_kiosk_toml(work, video, bundle, broker, fps))
    customer = Customer(f"http://127.0.0.1:{_screen_port(cfg)}/", expected)
    printer.new_round(customer.on_event)
    boots = " (restarted: it boots on the snapshot it synced)" if rnd == 2 else ""
    say(f"round {rnd}: running the kiosk over the video{boots}; the customer answers on its screen")
    with open(work / f"kiosk-{rnd}.log", "wb") as log:
        kiosk = subprocess.Popen(
            [sys.executable, "-m", "storelens", "kiosk", "run", "--config", str(cfg),
             *(["--exit-at-eof"] if rnd == 2 else [])],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=log,
        )  # fmt: skip
    print(f"   kiosk screen:     {customer.url}   (log: {work / f'kiosk-{rnd}.log'})")
    if dashboard is not None:
        print(f"   staff dashboard:  {dashboard.url}   review queue: {dashboard.url}review.html")
        print(f"   staff login:      staff / {staff_pw}")
    return kiosk, customer, expected, scene.n_frames / fps * 4 + 120


def _summary(
    held: list[Held], rounds: list[list[protocol.MatchEvent]], rcs: list[int], t_start: float, work: Path
) -> int:
    """Per product: round 1 vs round 2; then the before/after totals. 0 when every event came."""
    say("summary: the same products held up before and after the store taught the kiosk")
    k = max((len(e.results) for evs in rounds for e in evs), default=0)
    totals = []
    for evs in rounds:
        right = top = 0
        for h, e in zip(held, evs, strict=False):
            skus = [x.sku for x in e.results]
            right += bool(e.matched and skus and skus[0] == h.sku)
            top += h.sku in skus
        totals.append((right, top))
    for i, h in enumerate(held):
        cells = []
        for evs in rounds:
            ev = evs[i] if i < len(evs) else None
            skus = [x.sku for x in ev.results] if ev else []
            ok = bool(ev and ev.matched and skus and skus[0] == h.sku)
            rank = f"#{skus.index(h.sku) + 1}" if h.sku in skus else "--"
            cells.append(f"{'ok' if ok else '--'} {rank:<3}")
        before, after = [*cells, "", ""][:2]
        print(f"   {h.sku:<36} before: {before:<7} after: {after}")
    n = len(held)
    for name, i in (("before (studio photos only)", 0), ("after (+ confirmed store photos)", 1)):
        if i < len(totals):
            right, top = totals[i]
            print(f"   {name:<34} right first: {right:>2} of {n}   right among the top-{k}: {top:>2} of {n}")
    print(f"   kiosk exit codes: {rcs}")
    print(f"   wall time:               {time.monotonic() - t_start:.0f} s   (work dir: {work})")
    ok = len(rounds) == 2 and all(len(evs) == n for evs in rounds) and rcs == [0, 0]
    return 0 if ok else 1


def _review_as_staff(
    dashboard: Any, password: str, fb_dir: Path, collected: Collected, truth: dict[str, str],
    titles: dict[str, str],
) -> None:  # fmt: skip
    """Decide what the auto rule left pending, as staff member "staff": through the dashboard's review
    API (HTTP Basic, as the review page does) or, without a dashboard build, FeedbackStore.decide."""
    fb = FeedbackStore(fb_dir)
    pending = [r for r in fb.records(STORE) if r.status == "pending"]
    how = "the dashboard's review API (POST /api/review/decide)" if dashboard else "FeedbackStore.decide"
    say(f"staff review: {len(pending)} photos wait for a person; the demo decides as 'staff' through {how}")
    for r in pending:
        want = truth.get(collected.match_of.get(r.record_id, ""))
        if want is None:
            continue
        decision: Decision = "approved" if r.answer == "confirmed" and r.chosen_sku == want else "reassigned"
        if dashboard is not None:
            _decide_http(dashboard.url, password, r.record_id, decision, want)
        else:
            fb.decide(r.record_id, decision, who="staff", sku=want)
        said = "Not here" if r.answer == "not_here" else f"confirmed {r.chosen_sku}"
        print(f"   customer said {said:<40} -> {decision} as {titles.get(want, want)}")
    who = sorted({e.who for e in fb.history()})
    print(f"   store photos approved: {len(fb.approved(STORE))} (decided by {', '.join(who) or 'nobody'})")


def _decide_http(url: str, password: str, record_id: str, decision: str, sku: str) -> None:
    body = json.dumps({"record_id": record_id, "decision": decision,
                       "sku": sku if decision == "reassigned" else None}).encode()  # fmt: skip
    auth = base64.b64encode(f"staff:{password}".encode()).decode()
    req = urllib.request.Request(url + "api/review/decide", data=body, method="POST", headers={
        "Content-Type": "application/json", "X-StoreLens-Review": "1", "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def _wait_for(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    ev = threading.Event()
    while not pred() and time.monotonic() < deadline:
        ev.wait(0.1)
    return pred()


def _screen_snapshot(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "api/state", timeout=2) as r:
            v = json.loads(r.read()).get("snapshot")
    except (OSError, ValueError):
        return None
    return int(v) if isinstance(v, int) else None


def _screen_port(cfg: Path) -> int:
    import tomllib

    return int(tomllib.loads(cfg.read_text())["screen"]["port"])


def _start_dashboard(broker: Mosquitto, work: Path, fb_dir: Path, password: str) -> Any:
    try:
        from cloud.dashboard.serve import DashboardServer, PageConfig
        from cloud.dashboard.staff import StaffUsers, add_user
    except ImportError:
        return None
    if not (REPO / "build/dashboard/index.html").exists():
        print("   (dashboard not built: run `make setup`)")
        return None
    users = work / "staff.json"
    add_user(users, "staff", password)
    cfg = PageConfig(broker_ws_url=f"ws://127.0.0.1:{broker.ws_port}", store=STORE,
                     thumbnail_base="snapshots/{snapshot}/")  # fmt: skip
    (work / "kiosk-state").mkdir(exist_ok=True)
    return DashboardServer("127.0.0.1", 0, cfg, snapshots_dir=work / "kiosk-state", feedback_dir=fb_dir,
                           staff=StaffUsers(users)).start()  # fmt: skip


def _kiosk_toml(work: Path, video: Path, bundle: Path, broker: Mosquitto, fps: float) -> str:
    from storelens.devbroker import free_port

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

[feedback]
enabled = true
answer_timeout_s = 30.0

[outbox]
path = "{work / "outbox.sqlite"}"

[health]
interval_s = 2.0
"""


if __name__ == "__main__":
    sys.exit(main())
