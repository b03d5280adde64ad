"""The kiosk page: one self-contained HTML document (no external JS, CSS or fonts: works offline).

``#answer[data-state]`` is one of ``loading``, ``idle``, ``match``, ``not-found``; the shown product's
fields carry ``data-role`` (title, price, location, thumb). Sizes follow the viewport, so the same page
reads well on a 1280x800 panel and a 1080p screen.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>StoreLens</title>
<style>
:root { --bg:#0f141a; --panel:#18202a; --panel2:#212b37; --ink:#f4f6f8; --dim:#9aa7b4; --accent:#3ddc97;
  --warn:#ffb347; --u:min(1vw, 1.6vh); }
* { box-sizing:border-box; }
html,body { margin:0; height:100%; background:var(--bg); color:var(--ink); overflow:hidden;
  font-family: "DejaVu Sans", "Segoe UI", Roboto, Arial, sans-serif; }
body { display:flex; flex-direction:column; }
header { display:flex; justify-content:space-between; align-items:center; padding:calc(1.1*var(--u)) 2.2vw;
  background:#0a0e12; font-size:calc(1.9*var(--u)); letter-spacing:.03em; flex:none; }
header b { color:var(--accent); }
header .sub { color:var(--dim); }
#status { font-size:calc(1.45*var(--u)); color:var(--dim); display:flex; align-items:center; gap:.5em; }
#status::before { content:""; width:.7em; height:.7em; border-radius:50%; background:var(--accent); }
#status.bad { color:var(--warn); }
#status.bad::before { background:var(--warn); }
main { flex:1; min-height:0; display:grid; grid-template-columns:minmax(0,1fr) minmax(0,1.25fr);
  gap:2vw; padding:2vw 2.2vw; }
.panel { background:var(--panel); border-radius:calc(1.6*var(--u)); padding:calc(1.8*var(--u));
  overflow:hidden; display:flex; flex-direction:column; min-height:0; }
.cam { justify-content:center; gap:calc(1.6*var(--u)); }
#preview { display:block; width:100%; max-height:100%; min-height:0; border-radius:calc(1*var(--u));
  background:#000; aspect-ratio:4/3; object-fit:contain; }
#hint { font-size:calc(2.6*var(--u)); color:var(--dim); text-align:center; }
#hint.go { color:var(--accent); }
#hint.warn { color:var(--warn); }
#answer { justify-content:safe center; }  /* too tall: overflow below, never clip the title */
.center { text-align:center; display:flex; flex-direction:column; align-items:center;
  gap:calc(2*var(--u)); }
.center svg { width:calc(13*var(--u)); height:calc(13*var(--u)); }
.big { font-size:calc(4.6*var(--u)); line-height:1.2; font-weight:700; }
.big.warn { color:var(--warn); }
.more { font-size:calc(2.2*var(--u)); color:var(--dim); line-height:1.35; max-width:30em; }
.hit { display:flex; flex-direction:column; gap:calc(2*var(--u)); }
.hit h1 { font-size:calc(4.6*var(--u)); margin:0; line-height:1.12; overflow-wrap:anywhere;
  display:-webkit-box; -webkit-box-orient:vertical; -webkit-line-clamp:2; overflow:hidden; }
.hit .row { display:flex; gap:calc(2.6*var(--u)); align-items:center; }
.thumb { flex:none; width:calc(17*var(--u)); height:calc(17*var(--u)); background:#fff;
  border-radius:calc(1.4*var(--u)); display:flex; align-items:center; justify-content:center;
  overflow:hidden; }
.thumb img { max-width:90%; max-height:90%; object-fit:contain; }
.info { min-width:0; display:flex; flex-direction:column; gap:calc(1.8*var(--u)); }
.price { font-size:calc(5.6*var(--u)); font-weight:700; color:var(--accent); line-height:1; }
.where { font-size:calc(2.5*var(--u)); display:flex; align-items:center; gap:.4em; align-self:flex-start;
  background:var(--panel2); padding:.3em .7em .3em .5em; border-radius:calc(1*var(--u)); }
.where svg { width:1.1em; height:1.1em; flex:none; }
.others-label { margin-top:calc(3*var(--u)); font-size:calc(1.8*var(--u)); color:var(--dim); }
.others { display:flex; flex-direction:column; gap:calc(.8*var(--u)); margin-top:calc(1*var(--u)); }
.other { background:var(--panel2); border-radius:calc(1*var(--u));
  padding:calc(.7*var(--u)) calc(1.2*var(--u)); font-size:calc(1.9*var(--u)); display:flex;
  gap:calc(1.4*var(--u)); align-items:center; min-width:0; }
.other .thumb { width:calc(4.6*var(--u)); height:calc(4.6*var(--u)); border-radius:calc(.6*var(--u)); }
.other .tl { flex:1; min-width:0; }
.other .t, .other .l { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.other .l { color:var(--dim); font-size:.82em; }
.other .p { color:var(--accent); font-weight:700; white-space:nowrap; min-width:4.5em; text-align:right; }
</style></head>
<body>
<header><div><b>StoreLens</b> <span class="sub">&nbsp;Product finder</span></div>
  <div id="status" class="bad">connecting&hellip;</div></header>
<main>
  <section class="panel cam"><img id="preview" src="/preview.mjpg" alt="Live camera">
    <div id="hint">Camera ready</div></section>
  <section class="panel" id="answer" data-state="loading"><div class="center">
    <div class="big">Starting&hellip;</div></div></section>
</main>
<script>
const ESC = {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"};
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ESC[c]);
const HINTS = {idle:"Camera ready", present:"Hold it still\\u2026", steady:"Looking it up\\u2026",
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
const thumb = (u, role) => `<div class="thumb">${u ? `<img ${role ? 'data-role="thumb" ' : ""}` +
  `src="${esc(u)}" alt="">` : ""}</div>`;
function money(p, f) {  // the catalog's "12.90" as the store writes prices, when a currency is set
  if (!p || !f || !f.currency || !isFinite(Number(p))) return p || "";
  try { return new Intl.NumberFormat(f.locale, {style: "currency", currency: f.currency,
    maximumFractionDigits: 3}).format(Number(p)); }
  catch (e) { return p; }
}
function show(state, html) {
  const a = document.getElementById("answer");
  a.dataset.state = state;
  a.innerHTML = html;
}
function render(s) {
  const st = document.getElementById("status");
  const cam = s.camera === "streaming" || s.camera === "ended" ? "" : " \\u00b7 camera " + s.camera;
  st.textContent = s.status + cam + (s.snapshot ? ` \\u00b7 catalog v${s.snapshot}` : " \\u00b7 no catalog");
  st.className = (s.status === "online") ? "" : "bad";
  const hint = document.getElementById("hint");
  const r = s.result;
  const missed = s.detect === "result_shown" && r && !r.matched;
  hint.textContent = missed ? "Please ask staff" : HINTS[s.detect] || "";
  hint.className = missed ? "warn" : s.detect === "result_shown" ? "go" : "";
  if (!r) {
    if (!s.snapshot) { show("loading", `<div class="center"><div class="big">Catalog loading&hellip;</div>` +
      `<div class="more">The product finder will be ready in a moment.</div></div>`); return; }
    show("idle", `<div class="center">${ICON_HOLD}<div class="big">Hold an item up<br>to the camera</div>` +
      `<div class="more">We will show you its price and where to find it.</div></div>`);
    return;
  }
  if (!r.matched || !r.results.length) {
    show("not-found", `<div class="center">${ICON_ASK}<div class="big warn">Not found &mdash;<br>` +
      `please ask staff</div><div class="more">Or try again with the label facing the camera.</div></div>`);
    return;
  }
  const t = r.results[0];
  let h = `<div class="hit"><h1 data-role="title">${esc(t.title || t.sku)}</h1><div class="row">` +
    thumb(t.thumbnail_url, true) + `<div class="info">` +
    (t.price ? `<div class="price" data-role="price">${esc(money(t.price, s.price_format))}</div>` : "") +
    (t.location ? `<div class="where">${ICON_PIN}<span data-role="location">${esc(t.location)}</span></div>`
      : "") + `</div></div></div>`;
  const others = r.results.slice(1, 4);
  if (others.length) {
    h += `<div class="others-label">Not this one? Similar items</div><div class="others">` +
      others.map(o => `<div class="other">${thumb(o.thumbnail_url, false)}` +
        `<div class="tl"><div class="t">${esc(o.title || o.sku)}</div>` +
        `<div class="l">${esc(o.location || "")}</div></div>` +
        `<span class="p">${esc(money(o.price, s.price_format))}</span></div>`).join("") + `</div>`;
  }
  show("match", h);
}
function connect() {
  const es = new EventSource("/events");
  let lost = false;
  es.addEventListener("state", e => render(JSON.parse(e.data)));
  es.onopen = () => {  // after a kiosk restart the old MJPEG stream is dead: open a new one
    if (lost) document.getElementById("preview").src = "/preview.mjpg?t=" + Date.now();
    lost = false;
  };
  es.onerror = () => {
    lost = true;
    const st = document.getElementById("status");
    st.textContent = "reconnecting\\u2026"; st.className = "bad";
  };
}
fetch("/api/state").then(r => r.json()).then(render).catch(() => {});
connect();
</script></body></html>
"""
