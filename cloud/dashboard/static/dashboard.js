// StoreLens staff dashboard: MQTT.js over websockets, read-only, no backend of its own.
// Topics and payload fields are those of storelens/protocol.py (Status, Health, MatchEvent, Alert,
// UpdateProgress, SnapshotAnnouncement); unknown fields are ignored.
"use strict";

(function () {
  const APP = "storelens";
  // A health report older than this many of its own interval_s is "stale": the kiosk stopped reporting,
  // so its numbers are no longer shown as live (same factor as the Home Assistant expire_after).
  const STALE_FACTOR = 2.5;
  const FEED_MAX = 50;
  const ALERTS_MAX = 20;
  const TOP_WINDOW_MS = 3600 * 1000;
  const TOP_SHOWN = 5;
  const RECONNECT_MS = 2000; // MQTT.js retry period: quick enough for staff, gentle on the broker
  const CAMERA_LOST = new Set(["stalled", "error", "stopped", "lost"]);
  const UPDATE_STEPS = ["download", "verify", "compile", "selftest", "switch", "probation", "done"];
  const STATE_LABEL = {
    online: "Online", degraded: "Degraded", updating: "Updating", starting: "Starting",
    offline: "Offline", stale: "Stale", unknown: "Unknown",
  };
  const ALERT_TEXT = {
    camera_lost: ["Camera lost", "bad"], camera_back: ["Camera back", "info"],
    snapshot_refused: ["Catalog update refused", "bad"], snapshot_applied: ["Catalog updated", "info"],
    outbox_dropping: ["Outbox dropping telemetry", "warn"], update_failed: ["Update failed", "bad"],
    outbox_full: ["Outbox disk full: events held in memory", "warn"],
    rolled_back: ["Update rolled back", "warn"], catalog_stale: ["Catalog out of date", "warn"],
  };
  const PLACEHOLDER = "placeholder.svg";

  const $ = (id) => document.getElementById(id);
  const state = {
    cfg: null, connected: false, everConnected: false, kiosks: new Map(), feed: [], seenIds: new Set(),
    alerts: [], searches: [], misses: [], announced: null, openedAt: Date.now(), attemptFailed: false,
    models: {}, // model_id -> {name, version}: from the server's snapshots and the announcement
  };
  window.__storelens = state; // for support staff poking at the page (and the browser tests)

  // ---- small helpers ----
  function parseTs(ts) {
    const t = Date.parse(ts);
    return Number.isFinite(t) ? t : null;
  }
  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + " s ago";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min ago";
    const h = Math.floor(m / 60);
    return h + " h " + (m % 60) + " min ago";
  }
  function fmt(x, digits) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
  }
  function text(el, value) {
    if (el.textContent !== value) el.textContent = value;
  }
  function decode(payload) {
    try {
      const obj = JSON.parse(new TextDecoder().decode(payload));
      return obj && typeof obj === "object" && !Array.isArray(obj) ? obj : null;
    } catch (e) {
      return null;
    }
  }
  function kiosk(id) {
    let k = state.kiosks.get(id);
    if (!k) {
      k = { id, status: null, statusLive: false, statusSince: null, app: null, health: null,
            healthAt: null, dropping: false, update: null, el: null };
      state.kiosks.set(id, k);
    }
    return k;
  }

  // ---- config ----
  async function loadConfig() {
    let cfg = {};
    try {
      const r = await fetch("config.json", { cache: "no-store" });
      if (r.ok) cfg = await r.json();
    } catch (e) {
      /* served by mosquitto's http_dir without a config.json: fall back to the page's own host */
    }
    const q = new URLSearchParams(location.search);
    const store = q.get("store") || cfg.store || "";
    const scheme = location.protocol === "https:" ? "wss://" : "ws://"; // mosquitto serves the page over TLS
    let url = q.get("ws") || cfg.broker_ws_url || scheme + "{host}:" + (location.port || "9001");
    url = url.replace("{host}", location.hostname || "127.0.0.1");
    return {
      store, url, username: cfg.username || undefined, password: cfg.password || undefined,
      thumbnailBase: cfg.thumbnail_base || null, review: !!cfg.review,
    };
  }

  async function loadModels() {
    try {
      const r = await fetch("api/models", { cache: "no-store" });
      if (!r.ok) return;
      const body = await r.json();
      if (body && body.models && typeof body.models === "object") Object.assign(state.models, body.models);
      render();
    } catch (e) {
      /* no server (mosquitto's http_dir): models show by id */
    }
  }

  // "mobilenetv2 · 2026-11-20" for a model id (or a prefix of one) whose bundle name is known.
  function modelLabel(id) {
    if (!id) return "–";
    const key = Object.keys(state.models).find((m) => m === id || m.startsWith(id));
    const info = key && state.models[key];
    if (!info || !info.name) return String(id).slice(0, 12);
    return info.version ? info.name + " · " + String(info.version).slice(0, 10) : info.name;
  }

  // ---- MQTT ----
  function connect(cfg) {
    const clientId = "storelens-dash-" + Math.random().toString(16).slice(2, 10);
    const client = mqtt.connect(cfg.url, {
      clientId, username: cfg.username, password: cfg.password, clean: true, keepalive: 20,
      reconnectPeriod: RECONNECT_MS, connectTimeout: 5000, resubscribe: false, protocolVersion: 4,
    });
    const filters = {};
    filters["dt/" + APP + "/" + cfg.store + "/#"] = { qos: 1 };
    filters["bc/" + APP + "/" + cfg.store + "/snapshot"] = { qos: 1 };
    client.on("connect", () => {
      // Retained status/health/update arrive again right after this: until then nothing is live.
      state.connected = true;
      state.everConnected = true;
      client.subscribe(filters, (err) => {
        if (err) console.warn("subscribe failed", err);
      });
      render();
    });
    const lost = () => {
      state.attemptFailed = true;
      if (state.connected || !state.everConnected) {
        state.connected = false;
        for (const k of state.kiosks.values()) k.statusLive = false;
      }
      render();
    };
    client.on("close", lost);
    client.on("offline", lost);
    client.on("reconnect", render);
    client.on("error", (err) => console.warn("mqtt error", err && err.message));
    client.on("message", onMessage);
    return client;
  }

  function onMessage(topic, payload, packet) {
    if (topic === "bc/" + APP + "/" + state.cfg.store + "/snapshot") {
      const a = decode(payload);
      if (a && typeof a.version === "number") state.announced = a.version;
      if (a && typeof a.model_id === "string" && typeof a.model_name === "string") {
        state.models[a.model_id] = { name: a.model_name, version: a.model_version || "" };
      }
      return render();
    }
    const parts = topic.split("/");
    if (parts.length < 5 || parts[0] !== "dt" || parts[1] !== APP || parts[2] !== state.cfg.store) return;
    const id = parts[3];
    const rest = parts.slice(4).join("/");
    if (!payload || payload.length === 0) {
      if (rest === "status") state.kiosks.delete(id); // retained status cleared: kiosk decommissioned
      return render();
    }
    const msg = decode(payload);
    if (!msg) return;
    const k = kiosk(id);
    if (rest === "status" && msg.type === "status") {
      // A last will carries the time it was registered, not the time the kiosk died: for a will seen
      // live use the arrival time, for a retained one we do not know when it happened.
      const isWill = msg.state === "offline" && msg.reason === "lwt";
      k.statusSince = isWill ? (packet && packet.retain ? null : Date.now()) : parseTs(msg.since || msg.ts);
      if (msg.app) k.app = msg.app;
      k.status = msg;
      k.statusLive = true;
    } else if (rest === "health" && msg.type === "health") {
      const prev = k.health;
      k.dropping = !!(prev && typeof msg.outbox_dropped === "number" && msg.outbox_dropped > prev.outbox_dropped);
      k.health = msg;
      k.healthAt = parseTs(msg.ts);
    } else if (rest === "update" && msg.type === "update") {
      k.update = msg;
    } else if (rest === "events/match" && msg.type === "match") {
      addMatch(id, msg);
    } else if (rest === "events/alert" && msg.type === "alert") {
      addAlert(id, msg);
    }
    render();
  }

  // ---- model updates ----
  function addMatch(id, ev) {
    if (ev.id && state.seenIds.has(ev.id)) return; // QoS 1 is at-least-once
    if (ev.id) state.seenIds.add(ev.id);
    const at = parseTs(ev.ts) || Date.now();
    const best = Array.isArray(ev.results) && ev.results.length ? ev.results[0] : null;
    const item = { id: ev.id || String(at) + Math.random(), kiosk: id, at, matched: !!ev.matched && !!best,
                   best, threshold: ev.threshold, snapshot: ev.snapshot, latency: ev.latency_ms || {} };
    state.feed.unshift(item);
    state.feed.length = Math.min(state.feed.length, FEED_MAX);
    if (item.matched) state.searches.push({ at, sku: best.sku, title: best.title || best.sku });
    else state.misses.push(at); // a customer held up something the kiosk could not answer
    prependFeed(item);
  }

  function addAlert(id, a) {
    if (a.id && state.alerts.some((x) => x.id === a.id)) return;
    const [label, sev] = ALERT_TEXT[a.kind] || [a.kind, "warn"];
    state.alerts.unshift({ id: a.id, kiosk: id, label, sev, detail: a.detail || "", at: parseTs(a.ts) || Date.now() });
    state.alerts.length = Math.min(state.alerts.length, ALERTS_MAX);
  }

  // ---- derived view ----
  function view(k, now) {
    const h = k.health;
    const interval = h && typeof h.interval_s === "number" && h.interval_s > 0 ? h.interval_s : 30;
    const age = k.healthAt === null ? null : Math.max(0, now - k.healthAt);
    const stale = age !== null && age > STALE_FACTOR * interval * 1000;
    const st = k.status ? k.status.state : null;
    let shown;
    if (!state.connected || !k.statusLive) shown = "unknown";
    else if (st === "offline") shown = "offline";
    else if (stale || (!h && st === null)) shown = "stale";
    else shown = STATE_LABEL[st] ? st : "unknown";
    const live = state.connected && k.statusLive && st !== "offline" && !!h && !stale;
    return { shown, stale, age, live, interval };
  }

  function derivedAlerts(now) {
    const out = [];
    for (const k of state.kiosks.values()) {
      const v = view(k, now);
      if (!state.connected) continue;
      if (v.shown === "offline") {
        const r = k.status && k.status.reason === "lwt" ? "connection lost" : (k.status && k.status.reason) || "stopped";
        out.push({ kiosk: k.id, label: "Kiosk offline", sev: "bad", detail: r });
        continue;
      }
      if (v.stale) out.push({ kiosk: k.id, label: "Not reporting", sev: "warn", detail: "last health " + ago(v.age) });
      if (k.health && !v.stale && CAMERA_LOST.has(String(k.health.camera))) {
        out.push({ kiosk: k.id, label: "Camera lost", sev: "bad", detail: "camera " + k.health.camera });
      }
      if (k.dropping && !v.stale) {
        out.push({ kiosk: k.id, label: "Outbox dropping telemetry", sev: "warn",
                   detail: k.health.outbox_dropped + " dropped, " + k.health.outbox_depth + " queued" });
      }
      const u = k.update;
      if (u && (u.ok === false || u.step === "failed" || u.step === "rolled_back")) {
        out.push({ kiosk: k.id, label: u.step === "rolled_back" ? "Update rolled back" : "Update failed",
                   sev: u.step === "rolled_back" ? "warn" : "bad", detail: u.release + (u.detail ? ": " + u.detail : "") });
      }
    }
    return out;
  }

  // ---- rendering ----
  function render() {
    if (!state.cfg) return;
    const now = Date.now();
    renderConnection();
    renderKiosks(now);
    renderAlerts(now);
    renderFeedTimes(now);
    renderTop(now);
  }

  function renderConnection() {
    const conn = $("conn");
    // One broker state, said once: a broker down from the start is "unreachable", never "connecting"
    // beside an "All quiet" that nobody could know.
    let s = "connecting";
    if (state.connected) s = "connected";
    else if (state.everConnected) s = "reconnecting";
    else if (state.attemptFailed) s = "unreachable";
    conn.dataset.state = s;
    conn.className = "conn conn-" + s;
    text(conn, { connected: "Live", connecting: "Connecting…", reconnecting: "Reconnecting…",
                 unreachable: "Broker unreachable" }[s]);
    $("banner").hidden = s !== "reconnecting" && s !== "unreachable";
    text($("banner-title"), s === "unreachable" ? "Broker unreachable." : "Reconnecting…");
    text($("banner-text"), s === "unreachable"
      ? "The store broker cannot be reached (" + state.cfg.url + "); retrying every " + RECONNECT_MS / 1000 +
        " s. Nothing on this page is live."
      : "The connection to the store broker was lost. Figures below are the last known values and are not live.");
    text($("alert-empty"), state.connected ? "No alerts. All quiet." : "Alerts unknown: not connected to the broker.");
    if (state.cfg.store && typeof mqtt !== "undefined") {
      text($("kiosk-empty"), state.connected || s === "connecting" ? "Waiting for kiosks to report…"
        : "No kiosk data: not connected to the broker.");
    }
    text($("clock"), new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }));
  }

  function renderKiosks(now) {
    const list = $("kiosk-list");
    const ids = [...state.kiosks.keys()].sort();
    $("kiosk-empty").hidden = ids.length > 0;
    const counts = {};
    for (const id of ids) {
      const k = state.kiosks.get(id);
      if (!k.el) {
        k.el = $("kiosk-tpl").content.firstElementChild.cloneNode(true);
        k.el.dataset.kiosk = id;
        text(k.el.querySelector(".kiosk-name"), id);
      }
      if (list.children[ids.indexOf(id) + 1] !== k.el) list.insertBefore(k.el, list.children[ids.indexOf(id) + 1] || null);
      const v = view(k, now);
      counts[v.shown] = (counts[v.shown] || 0) + 1;
      renderKiosk(k, v);
    }
    for (const el of [...list.querySelectorAll(".kiosk")]) {
      if (!state.kiosks.has(el.dataset.kiosk)) el.remove();
    }
    const parts = Object.entries(counts).map(([s, n]) => n + " " + STATE_LABEL[s].toLowerCase());
    if (state.announced !== null) parts.push("catalog v" + state.announced + " announced");
    text($("kiosk-summary"), parts.join(" · "));
  }

  function renderKiosk(k, v) {
    const el = k.el;
    const q = (role) => el.querySelector('[data-role="' + role + '"]');
    el.dataset.state = v.shown;
    el.classList.toggle("not-live", !v.live);
    const pill = q("state");
    pill.className = "pill pill-" + v.shown;
    let label = STATE_LABEL[v.shown];
    if (v.shown === "unknown") label = state.connected ? "Waiting…" : "No connection";
    text(pill, label);

    const h = k.health;
    const s = k.status || {};
    let sub;
    if (!state.connected) sub = "Not live: reconnecting to the broker";
    else if (s.state === "offline") {
      sub = "Offline" + (s.reason === "lwt" ? " (connection lost)" : s.reason ? " (" + s.reason + ")" : "");
      if (k.statusSince) sub += " · since " + new Date(k.statusSince).toLocaleTimeString();
    }
    else if (!h) sub = "No health report yet";
    else if (v.stale) sub = "Last health " + ago(v.age) + " · not reporting (every " + v.interval + " s expected)";
    else sub = "Last health " + ago(v.age);
    text(q("health-age"), sub);

    const cam = (h && h.camera) || s.camera || "–";
    const camEl = q("camera");
    // An offline or silent kiosk's last camera report says nothing about its camera now.
    text(camEl, v.live || cam === "–" ? cam : "last: " + cam);
    camEl.className = v.live && CAMERA_LOST.has(String(cam)) ? "bad" : "";
    text(q("fps"), h ? fmt(h.fps, 1) : "–");
    const ob = q("outbox");
    text(ob, h ? String(h.outbox_depth) : "–");
    const dr = q("dropped");
    text(dr, h && typeof h.outbox_dropped === "number" ? String(h.outbox_dropped) : "–");
    dr.className = k.dropping ? "warn" : "";
    ob.className = k.dropping ? "warn" : "";
    const modelId = (h && h.model) || s.model || "";
    text(q("model"), modelLabel(modelId));
    const snap = h && h.snapshot !== null && h.snapshot !== undefined ? h.snapshot : s.snapshot;
    const snapEl = q("snapshot");
    text(snapEl, snap === null || snap === undefined ? "–" : "v" + snap);
    snapEl.className = state.announced !== null && typeof snap === "number" && snap < state.announced ? "warn" : "";
    text(q("app"), s.app || k.app || "–");
    q("model").title = modelId || "";

    const body = q("latency").tBodies[0];
    const lat = (h && h.latency_ms) || {};
    const rows = Object.keys(lat).map((stage) => stage + "|" + fmt(lat[stage].p50, 1) + "|" + fmt(lat[stage].p99, 1));
    const sig = rows.join(";");
    if (body.dataset.sig !== sig) {
      body.dataset.sig = sig;
      body.replaceChildren(...rows.map((r) => {
        const tr = document.createElement("tr");
        const [stage, p50, p99] = r.split("|");
        for (const [c, val] of [[stage, ""], [p50, " ms"], [p99, " ms"]].map((x) => x)) {
          const td = document.createElement("td");
          td.textContent = c === "–" ? c : c + val;
          tr.appendChild(td);
        }
        return tr;
      }));
    }
    q("latency").hidden = rows.length === 0;

    const up = q("update");
    const u = k.update;
    const active = u && !["idle", "done"].includes(u.step);
    up.hidden = !active;
    if (active) {
      const failed = u.ok === false || u.step === "failed" || u.step === "rolled_back";
      up.classList.toggle("failed", failed);
      const what = failed ? (u.step === "rolled_back" ? "Rolled back " : "Update failed: ") : "Updating to ";
      text(up.querySelector(".update-text"), what + u.release + " · " + u.step + (u.detail ? " · " + u.detail : ""));
      const i = UPDATE_STEPS.indexOf(u.step);
      up.querySelector(".bar span").style.width = (failed ? 100 : Math.round((100 * (i + 1)) / UPDATE_STEPS.length)) + "%";
    }
  }

  function renderAlerts(now) {
    const items = derivedAlerts(now).map((a) => ({ ...a, at: null }))
      .concat(state.alerts.filter((a) => now - a.at < TOP_WINDOW_MS));
    const list = $("alert-list");
    const sig = JSON.stringify(items.map((a) => [a.kiosk, a.label, a.detail, a.at && Math.floor((now - a.at) / 10000)]));
    if (list.dataset.sig !== sig) {
      list.dataset.sig = sig;
      list.replaceChildren(...items.map((a) => {
        const li = document.createElement("li");
        li.className = "alert " + a.sev;
        li.dataset.kiosk = a.kiosk;
        const dot = document.createElement("span");
        dot.className = "sev";
        const what = document.createElement("span");
        what.className = "what";
        what.textContent = a.kiosk + ": " + a.label;
        const detail = document.createElement("span");
        detail.className = "muted";
        detail.textContent = a.detail;
        const when = document.createElement("span");
        when.className = "when";
        when.textContent = a.at === null ? "now" : ago(now - a.at);
        li.append(dot, what, detail, when);
        return li;
      }));
    }
    $("alert-empty").hidden = items.length > 0;
    text($("alert-count"), items.length ? String(items.length) : "");
  }

  function thumbUrl(item) {
    const t = item.best && item.best.thumbnail;
    if (!t || !state.cfg.thumbnailBase || /^[a-z]+:|^\/|\.\./i.test(t)) return null;
    return state.cfg.thumbnailBase.replace("{snapshot}", String(item.snapshot)) + t;
  }

  function prependFeed(item) {
    const li = document.createElement("li");
    li.className = "match" + (item.matched ? "" : " no-match");
    li.dataset.eventId = item.id;
    li.dataset.kiosk = item.kiosk;
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = "";
    const url = item.matched ? thumbUrl(item) : null;
    img.src = url || PLACEHOLDER;
    img.dataset.placeholder = url ? "false" : "true";
    img.addEventListener("error", () => {
      if (img.dataset.placeholder === "true") return;
      img.dataset.placeholder = "true";
      img.src = PLACEHOLDER;
    });
    const body = document.createElement("div");
    body.className = "match-body";
    const title = document.createElement("div");
    title.className = "match-title";
    title.textContent = item.matched ? item.best.title || item.best.sku : "No match";
    const meta = document.createElement("div");
    meta.className = "match-meta";
    const when = document.createElement("span");
    when.className = "when";
    when.dataset.at = String(item.at);
    const lat = typeof item.latency.total === "number" ? " · " + Math.round(item.latency.total) + " ms" : "";
    const extra = item.matched ? (item.best.location ? " · " + item.best.location : "") : "";
    meta.append(item.kiosk + " · ", when, lat + extra);
    body.append(title, meta);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = item.best ? item.best.score.toFixed(2) : "–";
    if (!item.matched && item.best) score.title = "best score below the threshold " + item.threshold;
    li.append(img, body, score);
    const feed = $("feed");
    feed.prepend(li);
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  }

  function renderFeedTimes(now) {
    for (const w of $("feed").querySelectorAll(".when")) text(w, ago(now - Number(w.dataset.at)));
    $("feed-empty").hidden = state.feed.length > 0;
    text($("feed-count"), state.feed.length ? String(state.feed.length) : "");
  }

  function renderTop(now) {
    state.searches = state.searches.filter((s) => now - s.at < TOP_WINDOW_MS);
    const counts = new Map();
    for (const s of state.searches) {
      const c = counts.get(s.sku) || { title: s.title, n: 0 };
      c.n += 1;
      counts.set(s.sku, c);
    }
    const top = [...counts.values()].sort((a, b) => b.n - a.n || a.title.localeCompare(b.title)).slice(0, TOP_SHOWN);
    const list = $("top-items");
    const sig = JSON.stringify(top);
    if (list.dataset.sig !== sig) {
      list.dataset.sig = sig;
      list.replaceChildren(...top.map((t) => {
        const li = document.createElement("li");
        const name = document.createElement("span");
        name.textContent = t.title;
        const n = document.createElement("span");
        n.className = "count";
        n.textContent = t.n + "×";
        li.append(name, n);
        return li;
      }));
    }
    $("top-empty").hidden = top.length > 0;
    state.misses = state.misses.filter((at) => now - at < TOP_WINDOW_MS);
    const n = state.misses.length;
    text($("top-missed"), n ? `Not found: ${n} ${n === 1 ? "search" : "searches"} (items the store may not carry)` : "");
    $("top-missed").hidden = n === 0;
    const since = now - state.openedAt < TOP_WINDOW_MS
      ? "since " + new Date(state.openedAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "last hour";
    text($("top-window"), since);
  }

  async function main() {
    state.cfg = await loadConfig();
    text($("store-name"), state.cfg.store || "(no store set)");
    document.title = "StoreLens · " + (state.cfg.store || "dashboard");
    $("review-link").hidden = !state.cfg.review;
    render();
    loadModels();
    if (!state.cfg.store) {
      text($("kiosk-empty"), "No store configured: open this page with ?store=<store id>.");
      return;
    }
    if (typeof mqtt === "undefined") {
      text($("kiosk-empty"), "mqtt.min.js is missing: run make setup to build the dashboard.");
      return;
    }
    connect(state.cfg);
    setInterval(render, 1000);
  }

  document.addEventListener("DOMContentLoaded", main);
})();
