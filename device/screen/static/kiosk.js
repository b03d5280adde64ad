// The kiosk page. #answer[data-state] is loading | idle | match | not-found; the shown product's fields
// carry data-role (title, price, location, thumb). After a result it asks "Is this it?": the main result
// (data-role=confirm) and the similar items (data-role=similar) are buttons that confirm their sku,
// data-role=not-here says the store does not carry it; each tap is POSTed to /answer, once per result.
// The server decides when nobody answered (ask.state no_answer) and pushes every change over /events.
"use strict";
const ESC = {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"};
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ESC[c]);
const HINTS = {idle:"Camera ready", present:"Hold it still\u2026", steady:"Looking it up\u2026",
  result_shown:"Here it is", cooldown:"Thank you!"};
const ICON_HOLD = `<svg viewBox="0 0 64 64" fill="none" stroke="#9aa7b4" stroke-width="3"
  stroke-linecap="round" stroke-linejoin="round"><rect x="6" y="14" width="36" height="28" rx="5"/>
  <circle cx="24" cy="28" r="8"/><path d="M42 24l14-7v22l-14-7"/><path d="M18 54h28M32 42v12"/></svg>`;
const ICON_ASK = `<svg viewBox="0 0 64 64" fill="none" stroke="#ffb347" stroke-width="3.5"
  stroke-linecap="round"><circle cx="32" cy="32" r="27"/>
  <path d="M24 25a8 8 0 1 1 11 7.4c-2 .9-3 2.4-3 4.6v2"/>
  <circle cx="32" cy="47" r="1.2" fill="#ffb347"/></svg>`;
const ICON_PIN = `<svg viewBox="0 0 24 24" fill="#3ddc97"><path d="M12 2a7 7 0 0 0-7 7c0 5.2 7 13 7 13s7-7.8
  7-13a7 7 0 0 0-7-7zm0 9.5A2.5 2.5 0 1 1 12 6.5a2.5 2.5 0 0 1 0 5z"/></svg>`;
const NOTE = "Tapping the right product sends its photo to this store to improve the product finder.";
const thumb = (u, role) => `<div class="thumb">${u ? `<img ${role ? 'data-role="thumb" ' : ""}` +
  `src="${esc(u)}" alt="">` : ""}</div>`;

function amount(p) {  // "12.90", "12,90", "1 299,00" -> a number; null when the text carries a currency
  const s = String(p).trim();
  if (!s || /[^\d\s.,'\u00a0\u202f-]/.test(s)) return null;
  let t = s.replace(/[\s'\u00a0\u202f]/g, "");
  const comma = t.lastIndexOf(","), dot = t.lastIndexOf(".");
  if (comma >= 0 && dot >= 0) {  // both: the last one is the decimal separator
    t = comma > dot ? t.replace(/\./g, "").replace(",", ".") : t.replace(/,/g, "");
  } else if (comma >= 0) {  // "12,90" decimal; "1,299" thousands
    t = /^-?\d+,\d{1,2}$/.test(t) ? t.replace(",", ".") : t.replace(/,/g, "");
  }
  const n = Number(t);
  return isFinite(n) && t !== "" ? n : null;
}
function money(p, f) {  // the catalog's price as the store's shelf labels write it, when a currency is set
  if (!p) return "";
  const n = amount(p);
  if (n === null || !f || !f.currency) return String(p);  // already "12,90 kr" / "$3.99": never doubled
  try { return new Intl.NumberFormat(f.locale, {style: "currency", currency: f.currency,
    minimumFractionDigits: 2, maximumFractionDigits: 3}).format(n); }
  catch (e) { return String(p); }
}
function show(state, html) {
  const a = document.getElementById("answer");
  a.dataset.state = state;
  a.innerHTML = html;
}
let current = null;  // the result on screen: {id, ask}
function statusText(s) {
  const cam = s.camera === "streaming" || s.camera === "ended" ? "" : " \u00b7 camera " + s.camera;
  const cat = s.snapshot ? ` \u00b7 catalog v${s.snapshot}` : " \u00b7 no catalog";
  if (s.broker === "offline") {  // the kiosk still answers; what it sends waits in its outbox
    return [(s.status === "online" ? "offline" : s.status + " \u00b7 offline") + cam + cat, false];
  }
  return [s.status + cam + cat, s.status === "online"];
}
function askHeader(ask, matched) {
  if (!ask) return "";
  if (ask.state === "open") {
    return `<div class="ask" data-role="ask"><span class="q">${matched ? "Is this it?" : "Is it one of these?"}` +
      `</span><span class="how">Tap the product</span></div>`;
  }
  const done = {confirmed: "Thank you!", not_here: "Thank you \u2014 please ask staff", no_answer: ""};
  const text = done[ask.state] || "";
  return text ? `<div class="ask" data-role="ask" data-answer="${esc(ask.state)}"><span class="q done">` +
    `${text}</span></div>` : "";
}
function pick(ask, sku, role) {  // [extra class, attributes] of a tappable product
  const chosen = ask && ask.state === "confirmed" && ask.sku === sku ? " chosen" : "";
  const off = !ask || ask.state !== "open" ? "disabled " : "";
  return [chosen, `${off}data-role="${role}" data-sku="${esc(sku)}"`];
}
function card(o, ask, pf) {
  const [chosen, attrs] = pick(ask, o.sku, "similar");
  return `<button class="other pick${chosen}" ${attrs}>` +
    thumb(o.thumbnail_url, false) + `<div class="t">${esc(o.title || o.sku)}</div>` +
    `<div class="p">${esc(money(o.price, pf))}</div><div class="l">${esc(o.location || "")}</div></button>`;
}
function tail(ask, note) {
  if (!ask) return "";
  const open = ask.state === "open";
  if (!open && ask.state !== "not_here") return "";
  return `<button class="nothere${ask.state === "not_here" ? " chosen" : ""}" data-role="not-here"` +
    `${open ? "" : " disabled"}>Not here? Not sold in this store</button>` +
    (note && open ? `<div class="note" data-role="feedback-note">${NOTE}</div>` : "");
}
let rendered = -1;  // the state version on screen: an older one (the first fetch answering late) is ignored
// One entry per result shown, for measuring held still -> painted (bench/paint.py): its id, the epoch ms
// the kiosk saw the item steady (held_ms) and answered it (answered_ms), and paint_ms, epoch ms taken in
// the first animation frame after the DOM update. The newest PAINTS_KEPT only: a kiosk runs for days.
const PAINTS_KEPT = 200;
window.storelensPaints = [];
let paintedId = null;
function notePaint(r) {
  if (!r || !r.id || r.id === paintedId) return;
  paintedId = r.id;
  requestAnimationFrame(() => {
    const paints = window.storelensPaints;
    paints.push({id: r.id, held_ms: r.held_ms ?? null, answered_ms: r.answered_ms ?? null,
      paint_ms: performance.timeOrigin + performance.now()});
    if (paints.length > PAINTS_KEPT) paints.splice(0, paints.length - PAINTS_KEPT);
  });
}
function render(s) {
  if (s.version < rendered) return;
  rendered = s.version;
  draw(s);
  notePaint(s.result);
}
function draw(s) {
  const st = document.getElementById("status");
  const [text, ok] = statusText(s);
  st.textContent = text;
  st.className = ok ? "" : "bad";
  const hint = document.getElementById("hint");
  const r = s.result;
  const missed = s.detect === "result_shown" && r && !r.matched;
  hint.textContent = missed ? "Please ask staff" : HINTS[s.detect] || "";
  hint.className = missed ? "warn" : s.detect === "result_shown" ? "go" : "";
  current = r ? {id: r.id, ask: r.ask} : null;
  if (!r) {
    if (!s.snapshot) { show("loading", `<div class="center"><div class="big">Catalog loading&hellip;</div>` +
      `<div class="more">The product finder will be ready in a moment.</div></div>`); return; }
    show("idle", `<div class="center">${ICON_HOLD}<div class="big">Hold an item up<br>to the camera</div>` +
      `<div class="more">We will show you its price and where to find it.</div></div>`);
    return;
  }
  const ask = r.ask || null;
  const pf = s.price_format;
  const cls = ask && ask.state !== "open" ? "asked" : "";
  if (!r.matched || !r.results.length) {
    const cands = ask ? r.results.filter(o => ask.shown.includes(o.sku)) : [];
    let h = `<div class="center${cands.length ? " compact" : ""}">${ICON_ASK}<div><div class="big warn">` +
      `Not found &mdash;<br>please ask staff</div>` +
      (cands.length ? "" : `<div class="more">Or try again with the label facing the camera.</div>`) +
      `</div></div>`;
    if (cands.length) {
      h += askHeader(ask, false) + `<div class="others ${cls}">` + cands.map(o => card(o, ask, pf)).join("") +
        `</div>` + tail(ask, s.feedback_note);
    }
    show("not-found", h);
    return;
  }
  const t = r.results[0];
  const [chosen, attrs] = pick(ask, t.sku, "confirm");
  let h = askHeader(ask, true) + `<button class="hit pick${chosen}" ${attrs}>` +
    `<h1 data-role="title">${esc(t.title || t.sku)}</h1><div class="row">` +
    thumb(t.thumbnail_url, true) + `<div class="info">` +
    (t.price ? `<div class="price" data-role="price">${esc(money(t.price, pf))}</div>` : "") +
    (t.location ? `<div class="where">${ICON_PIN}<span data-role="location">${esc(t.location)}</span></div>`
      : "") + `</div></div></button>`;
  const others = r.results.slice(1, 4);
  if (others.length) {
    h += `<div class="others-label">${ask && ask.state === "open" ? "Or one of these?" : "Similar items"}` +
      `</div><div class="others ${cls}">` + others.map(o => card(o, ask, pf)).join("") + `</div>`;
  }
  show("match", h + tail(ask, s.feedback_note));
}
function post(answer, sku) {  // one tap per result: the buttons are disabled at once, the server confirms
  if (!current || !current.id || !current.ask || current.ask.state !== "open") return;
  document.querySelectorAll("#answer button").forEach(b => { b.disabled = true; });
  fetch("/answer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({match_id: current.id, answer: answer, sku: sku})}).catch(() => {});
}
document.getElementById("answer").addEventListener("click", e => {
  const b = e.target.closest("button");
  if (!b || b.disabled) return;
  if (b.dataset.role === "not-here") post("not_here", null);
  else if (b.dataset.sku) post("confirmed", b.dataset.sku);
});
function connect() {
  const es = new EventSource("/events");
  let lost = false;
  es.addEventListener("state", e => render(JSON.parse(e.data)));
  es.onopen = () => {  // after a kiosk restart the old MJPEG stream is dead: open a new one
    if (lost) document.getElementById("preview").src = "/preview.mjpg?t=" + Date.now();
    if (lost) rendered = -1;  // a restarted kiosk counts its state versions from 0 again
    lost = false;
  };
  es.onerror = () => {
    lost = true;
    const st = document.getElementById("status");
    st.textContent = "reconnecting\u2026"; st.className = "bad";
  };
}
fetch("/api/state").then(r => r.json()).then(render).catch(() => {});
connect();
