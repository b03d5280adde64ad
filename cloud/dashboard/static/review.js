// StoreLens review queue: customers' photos from the kiosks, decided by staff (cloud/dashboard/review.py).
// The server answers only a signed-in staff member; every decision is a POST with a JSON body and the
// X-StoreLens-Review header (a cross-site page cannot send it), stored with who/when and reversible.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const DECIDED = new Set(["approved", "rejected", "not_carried"]);
  const state = { tab: "pending", data: null, catalog: new Map(), busy: false };
  window.__review = state; // for support staff and the browser tests

  function text(el, value) {
    if (el.textContent !== value) el.textContent = value;
  }
  function when(ts) {
    const t = Date.parse(ts);
    return Number.isFinite(t) ? new Date(t).toLocaleString([], { dateStyle: "short", timeStyle: "short" }) : "";
  }
  function title(sku) {
    const it = state.catalog.get(sku);
    return it ? it.title : sku;
  }
  function showError(message) {
    const el = $("error");
    text(el, message || "");
    el.hidden = !message;
  }

  async function load() {
    try {
      const r = await fetch("api/review?status=all", { cache: "no-store" });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.error || "the server answered " + r.status);
      state.data = body;
      state.catalog = new Map(body.catalog.map((it) => [it.sku, it]));
      showError("");
    } catch (e) {
      showError("Cannot load the review queue: " + e.message);
    }
    render();
  }

  async function decide(record, decision, sku) {
    if (state.busy) return;
    state.busy = true;
    document.body.dataset.busy = "true";
    try {
      const r = await fetch("api/review/decide", {
        method: "POST", cache: "no-store",
        headers: { "Content-Type": "application/json", "X-StoreLens-Review": "1" },
        body: JSON.stringify({ record_id: record.record_id, decision, sku: sku || null }),
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.error || "the server answered " + r.status);
      showError("");
    } catch (e) {
      showError("The decision was not saved: " + e.message);
    } finally {
      state.busy = false;
      document.body.dataset.busy = "false";
    }
    await load();
  }

  function decisionText(rec) {
    const by = rec.decided_by ? " by " + rec.decided_by + " · " + when(rec.decided_ts) : "";
    switch (rec.decision) {
      case "approved": return "Approved as " + title(rec.label_sku) + by;
      case "reassigned": return "Re-assigned to " + title(rec.label_sku) + by;
      case "rejected": return "Rejected" + by;
      case "not_carried": return "Not carried" + by;
      case "pending": return "Undone" + by;
      default: return "";
    }
  }

  function card(rec) {
    const el = $("card-tpl").content.firstElementChild.cloneNode(true);
    el.dataset.record = rec.record_id;
    el.dataset.status = rec.status;
    el.dataset.answer = rec.answer;
    const img = el.querySelector(".crop");
    img.src = rec.crop;
    const score = typeof rec.top_score === "number" ? " · score " + rec.top_score.toFixed(2) : "";
    text(el.querySelector(".card-meta"), rec.kiosk + " · " + when(rec.ts) + score);
    const dec = el.querySelector('[data-role="decision"]');
    text(dec, decisionText(rec));
    dec.hidden = !dec.textContent;
    const confirmed = rec.answer === "confirmed";
    const button = (action) => el.querySelector('[data-action="' + action + '"]');
    button("approved").hidden = !confirmed || rec.decision === "approved";
    button("rejected").hidden = rec.decision === "rejected";
    button("not_carried").hidden = confirmed || rec.decision === "not_carried";
    button("pending").hidden = !DECIDED.has(rec.status);
    text(el.querySelector(".assign-label"), confirmed ? "Re-assign to" : "Assign to");
    const picker = el.querySelector('[data-role="picker"]');
    for (const it of state.catalog.values()) {
      if (confirmed && it.sku === rec.chosen_sku) continue;
      const o = document.createElement("option");
      o.value = it.sku;
      o.textContent = it.title + " (" + it.sku + ")";
      picker.appendChild(o);
    }
    for (const b of el.querySelectorAll("button[data-action]")) {
      b.addEventListener("click", () => {
        const action = b.dataset.action;
        if (action === "reassigned") {
          if (!picker.value) return showError("Choose a product first.");
          return decide(rec, "reassigned", picker.value);
        }
        return decide(rec, action);
      });
    }
    return el;
  }

  function groupHead(sku) {
    const head = document.createElement("div");
    head.className = "group-head";
    const it = state.catalog.get(sku);
    const img = document.createElement("img");
    img.alt = "Catalog photo";
    img.className = "catalog-photo";
    img.src = it && it.thumbnail ? it.thumbnail : "placeholder.svg";
    img.addEventListener("error", () => { img.src = "placeholder.svg"; }, { once: true });
    const name = document.createElement("div");
    const h = document.createElement("h3");
    h.textContent = title(sku);
    const sub = document.createElement("div");
    sub.className = "muted";
    sub.textContent = sku + (it ? "" : " · not in the current catalog");
    name.append(h, sub);
    head.append(img, name);
    return head;
  }

  function render() {
    const d = state.data;
    if (!d) return;
    text($("store-name"), d.store);
    text($("who"), d.who);
    const inTab = (r) => (state.tab === "pending" ? r.status === "pending" : DECIDED.has(r.status));
    const pending = d.records.filter((r) => r.status === "pending").length;
    text($("count-pending"), "(" + pending + ")");
    text($("count-decided"), "(" + d.records.filter((r) => DECIDED.has(r.status)).length + ")");
    for (const t of document.querySelectorAll(".tab")) {
      t.setAttribute("aria-pressed", String(t.dataset.status === state.tab));
    }
    const shown = d.records.filter(inTab);
    const groups = new Map();
    for (const r of shown.filter((x) => x.answer === "confirmed")) {
      if (!groups.has(r.chosen_sku)) groups.set(r.chosen_sku, []);
      groups.get(r.chosen_sku).push(r);
    }
    $("groups").replaceChildren(...[...groups.entries()]
      .sort((a, b) => title(a[0]).localeCompare(title(b[0])))
      .map(([sku, recs]) => {
        const g = document.createElement("section");
        g.className = "group";
        g.dataset.sku = sku;
        const cards = document.createElement("div");
        cards.className = "cards";
        cards.append(...recs.map(card));
        g.append(groupHead(sku), cards);
        return g;
      }));
    $("groups-empty").hidden = groups.size > 0;
    const notHere = shown.filter((x) => x.answer === "not_here");
    $("not-here").replaceChildren(...notHere.map(card));
    $("not-here-empty").hidden = notHere.length > 0;
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  }

  function main() {
    for (const t of document.querySelectorAll(".tab")) {
      t.addEventListener("click", () => {
        state.tab = t.dataset.status;
        render();
      });
    }
    load();
  }

  document.addEventListener("DOMContentLoaded", main);
})();
