"""The kiosk page: one self-contained HTML document (no external JS, CSS or fonts: works offline)."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>StoreLens</title>
<style>
:root { --bg:#10151c; --panel:#19212b; --ink:#f4f6f8; --dim:#9aa7b4; --accent:#3ddc97; --warn:#ffb347; }
* { box-sizing:border-box; }
html,body { margin:0; height:100%; background:var(--bg); color:var(--ink);
  font-family: "DejaVu Sans", "Segoe UI", Roboto, Arial, sans-serif; }
header { display:flex; justify-content:space-between; align-items:center; padding:14px 28px;
  background:#0b0f14; font-size:22px; letter-spacing:.04em; }
header b { color:var(--accent); }
#status { font-size:18px; color:var(--dim); }
#status.bad { color:var(--warn); }
main { display:grid; grid-template-columns: minmax(0,1fr) minmax(0,1.15fr); gap:24px; padding:24px 28px;
  height:calc(100% - 60px); }
.panel { background:var(--panel); border-radius:18px; padding:20px; overflow:hidden; }
#preview { width:100%; border-radius:12px; background:#000; aspect-ratio:4/3; object-fit:contain; }
#hint { font-size:30px; margin-top:18px; color:var(--dim); text-align:center; }
#answer h1 { font-size:48px; margin:6px 0 4px; line-height:1.1; }
.top { display:flex; gap:24px; align-items:center; }
.top img { width:260px; height:260px; object-fit:contain; background:#fff; border-radius:14px; }
.price { font-size:56px; font-weight:700; color:var(--accent); }
.where { font-size:34px; margin-top:8px; }
.where span { background:#263241; padding:4px 14px; border-radius:10px; }
.others { display:flex; gap:14px; margin-top:26px; flex-wrap:wrap; }
.other { width:170px; background:#222c38; border-radius:12px; padding:10px; font-size:17px; }
.other img { width:150px; height:110px; object-fit:contain; background:#fff; border-radius:8px; }
.other .p { color:var(--accent); font-weight:700; }
.notfound { font-size:52px; color:var(--warn); margin-top:40px; text-align:center; line-height:1.25; }
.idle { font-size:46px; color:var(--dim); margin-top:90px; text-align:center; line-height:1.3; }
</style></head>
<body>
<header><div><b>StoreLens</b> &nbsp;Product finder</div><div id="status">connecting&hellip;</div></header>
<main>
  <section class="panel"><img id="preview" src="/preview.mjpg" alt="camera">
    <div id="hint">Hold a product up to the camera</div></section>
  <section class="panel" id="answer"><div class="idle">Hold a product up<br>to the camera</div></section>
</main>
<script>
const ESC = {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"};
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ESC[c]);
const img = u => u ? `<img src="${esc(u)}" alt="">` : `<img alt="">`;
const HINTS = {idle:"Hold a product up to the camera", present:"Hold it still\\u2026",
  steady:"Looking it up\\u2026", result_shown:"Here it is", cooldown:"Thank you!"};
function render(s) {
  const st = document.getElementById("status");
  st.textContent = `${s.status}${s.camera !== "streaming" ? " \\u00b7 camera " + s.camera : ""}` +
    (s.snapshot ? ` \\u00b7 catalog v${s.snapshot}` : " \\u00b7 no catalog");
  st.className = (s.status === "online") ? "" : "bad";
  document.getElementById("hint").textContent = HINTS[s.detect] || "";
  const a = document.getElementById("answer");
  const r = s.result;
  if (!r) { a.innerHTML = `<div class="idle">${s.snapshot ? "Hold a product up<br>to the camera" :
            "Catalog loading&hellip;"}</div>`; return; }
  if (!r.matched || !r.results.length) {
    a.innerHTML = `<div class="notfound">Not found<br>&mdash; please ask staff</div>`; return; }
  const t = r.results[0];
  let h = `<div class="top">${img(t.thumbnail_url)}<div><h1>${esc(t.title || t.sku)}</h1>` +
    `<div class="price">${esc(t.price || "")}</div>` +
    `<div class="where">${t.location ? "<span>" + esc(t.location) + "</span>" : ""}</div></div></div>`;
  if (r.results.length > 1) {
    h += `<div class="others">` + r.results.slice(1).map(o => `<div class="other">${img(o.thumbnail_url)}` +
      `<div>${esc(o.title || o.sku)}</div><div class="p">${esc(o.price || "")}</div>` +
      `<div>${esc(o.location || "")}</div></div>`).join("") + `</div>`;
  }
  a.innerHTML = h;
}
function connect() {
  const es = new EventSource("/events");
  es.addEventListener("state", e => render(JSON.parse(e.data)));
  es.onerror = () => { document.getElementById("status").textContent = "reconnecting\\u2026"; };
}
fetch("/api/state").then(r => r.json()).then(render).catch(() => {});
connect();
</script></body></html>
"""
