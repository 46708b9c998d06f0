"""The router's live dashboard: one self-contained HTML page (no external assets).

Every 2 s it fetches `/health`, `/workers` and `/metrics` and shows the router's health, a
table of workers (role, health, why a worker is down, circuit breaker, its metrics endpoint,
every load field it reports: none for a down worker, whose last report is stale) and the
gateway's request counts by API and HTTP status (any `*_total` sample with `api` and `status`
labels), plus the router's other unlabelled `baton_` gauges and counters. With
`--protect-admin-endpoints` those routes need an admin key: the page asks for it once and keeps
it in the tab's session storage (sent as `Authorization: Bearer`).
"""
from __future__ import annotations

import html

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Baton router: __MODEL__</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:12px 20px;display:flex;gap:16px;align-items:center}
 header h1{font-size:18px;margin:0} .pill{padding:2px 10px;border-radius:10px;font-weight:600}
 .ok{background:#1f9d55;color:#fff} .bad{background:#d64545;color:#fff} .warn{background:#e0a100;color:#fff}
 main{padding:16px 20px;display:grid;gap:16px}
 section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px}
 h2{font-size:15px;margin:0 0 8px} table{border-collapse:collapse;width:100%}
 th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}
 th{color:#5a6475;font-weight:600} #updated{margin-left:auto;opacity:.7;font-size:12px}
 .muted{color:#8a93a3}
</style></head>
<body>
<header><h1>Baton router</h1><span>model <b>__MODEL__</b></span>
 <span id="health" class="pill warn">…</span><span id="updated"></span></header>
<main>
 <section id="keybox" hidden><h2>Admin key</h2><form id="keyform">This router protects its operator pages:
  <input id="key" type="password" autocomplete="off" placeholder="admin key"> <button>Use</button></form></section>
 <section><h2>Workers</h2><table id="workers"><tr><td class="muted">loading…</td></tr></table></section>
 <section><h2>Requests (gateway)</h2><table id="requests"><tr><td class="muted">loading…</td></tr></table></section>
 <section><h2>Router metrics</h2><table id="metrics"><tr><td class="muted">loading…</td></tr></table></section>
</main>
<script>
"use strict";
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const fmt = v => typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(3)) : esc(v);
function table(el, head, rows) {
  if (!rows.length) { el.innerHTML = '<tr><td class="muted">none</td></tr>'; return; }
  el.innerHTML = "<tr>" + head.map(h => "<th>" + esc(h) + "</th>").join("") + "</tr>" +
    rows.map(r => "<tr>" + r.map(c => "<td>" + c + "</td>").join("") + "</tr>").join("");
}
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    (m[3] || "").replace(/(\w+)="((?:[^"\\]|\\.)*)"/g, (_, k, v) => { labels[k] = v; });
    out.push({name: m[1], labels, value: parseFloat(m[4])});
  }
  return out;
}
function authed(path) {
  const key = sessionStorage.getItem("batonAdminKey");
  return fetch(path, key ? {headers: {Authorization: "Bearer " + key}} : {}).then(r => {
    if (r.status === 401 || r.status === 403) { document.getElementById("keybox").hidden = false; throw new Error("key"); }
    return r;
  });
}
function workerCells(w, keys) {
  const down = !w.healthy;
  return [esc(w.address), esc(w.role),
    '<span class="pill ' + (down ? "bad" : "ok") + '">' + (down ? "down" : "healthy") + "</span>",
    down ? esc(w.error || "not checked yet") : "", esc(w.breaker ?? ""), esc(w.metrics || ""),
    ...keys.map(k => down || !w.load ? '<span class="muted">–</span>' : fmt(w.load[k] ?? ""))];
}
async function refreshWorkers() {
  const workers = await (await authed("workers")).json();
  const keys = [...new Set(workers.flatMap(w => Object.keys(w.load || {})))].sort();
  table(document.getElementById("workers"), ["address", "role", "healthy", "why down", "breaker", "metrics", ...keys],
    workers.map(w => workerCells(w, keys)));
}
async function refreshMetrics() {
  const samples = parseMetrics(await (await authed("metrics")).text());
  const counts = {}, statuses = new Set();
  for (const s of samples) {
    if (!s.name.endsWith("_total") || !("api" in s.labels) || !("status" in s.labels)) continue;
    statuses.add(s.labels.status);
    counts[s.labels.api] = counts[s.labels.api] || {};
    counts[s.labels.api][s.labels.status] = (counts[s.labels.api][s.labels.status] || 0) + s.value;
  }
  const cols = [...statuses].sort();
  table(document.getElementById("requests"), ["api", ...cols, "all"],
    Object.keys(counts).sort().map(api => [esc(api), ...cols.map(c => fmt(counts[api][c] || 0)),
      fmt(Object.values(counts[api]).reduce((a, b) => a + b, 0))]));
  const plain = samples.filter(s => s.name.startsWith("baton_") && !Object.keys(s.labels).length &&
    !/_(bucket|created|sum|count)$/.test(s.name));
  table(document.getElementById("metrics"), ["metric", "value"], plain.map(s => [esc(s.name), fmt(s.value)]));
}
async function refreshHealth() {
  const el = document.getElementById("health");
  try {
    const r = await fetch("health");
    el.textContent = r.ok ? "serving" : "not serving"; el.className = "pill " + (r.ok ? "ok" : "bad");
  } catch (e) { el.textContent = "unreachable"; el.className = "pill bad"; }
}
async function refresh() {
  await Promise.allSettled([refreshHealth(), refreshWorkers(), refreshMetrics()]);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
document.getElementById("keyform").addEventListener("submit", e => {
  e.preventDefault(); sessionStorage.setItem("batonAdminKey", document.getElementById("key").value);
  document.getElementById("keybox").hidden = true; refresh();
});
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


def dashboard_html(model_name: str) -> str:
    """The dashboard page for a router serving `model_name`."""
    return _PAGE.replace("__MODEL__", html.escape(model_name))
