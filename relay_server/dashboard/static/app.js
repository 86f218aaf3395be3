"use strict";
// The relayd dashboard: plain JS, no dependencies.  Every value that comes from the API (names a
// peer chose, addresses, error texts) reaches the page as text (textContent, attributes set one by
// one), never as HTML.
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const SVG = "http://www.w3.org/2000/svg";

async function api(method, path, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf } };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  let data = null;
  if (r.status !== 204) { try { data = await r.json(); } catch (_) { data = null; } }
  if (!r.ok) {
    const d = data && data.detail;
    const msg = Array.isArray(d) ? d.map(e => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ") : d;
    const err = new Error(typeof msg === "string" && msg ? msg : `${r.status} ${r.statusText}`);
    err.status = r.status; err.detail = d;
    throw err;
  }
  return data;
}

// h("td", {class: "x", dataset: {a: "b"}, title: "t"}, "text", child, ...): children are nodes or text
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k in e && typeof v !== "string") e[k] = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}
function s(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}
function fill(tbody, rows) { tbody.replaceChildren(...rows); }

function bytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  n = Number(n) || 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function rate(n) {  // bytes per second, K/M/G
  const u = ["B/s", "KB/s", "MB/s", "GB/s", "TB/s"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  const digits = n === 0 || Number.isInteger(n) ? 0 : n < 10 ? 1 : 0;
  return n.toFixed(digits) + " " + u[i];
}
function ago(ts) {
  if (!ts) return "never";
  const sec = Math.max(0, Date.now() / 1000 - ts);
  return sec < 60 ? "now" : sec < 3600 ? Math.floor(sec / 60) + " min ago" : Math.floor(sec / 3600) + " h ago";
}
function utcText(ts) { return ts ? new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC" : ""; }
function timeText(ts) {
  const d = new Date(ts * 1000), today = new Date().toDateString() === d.toDateString();
  const t = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return today ? t : d.toLocaleDateString() + " " + t;
}
function tunnelHref(client, name) { return `#/tunnel/${enc(client)}/${enc(name)}`; }
function tunnelPath(client, name) { return `/api/v1/tunnels/${enc(client)}/${enc(name)}`; }

// --- charts -----------------------------------------------------------------------------------

const RANGES = [["15 min", 900], ["1 h", 3600], ["24 h", 86400], ["7 d", 7 * 86400]];

function rangeButtons(container, state, onChange) {
  container.replaceChildren(...RANGES.map(([label, secs]) => h("button", {
    type: "button", class: "plain range", dataset: { range: String(secs) }, "aria-pressed": String(secs === state.range),
    on: { click: () => {
      state.range = secs;
      for (const b of container.children) b.setAttribute("aria-pressed", String(Number(b.dataset.range) === secs));
      onChange();
    } },
  }, label)));
}

function niceStep(x) {  // 1, 2, 2.5 or 5 times a power of ten, at least x
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

// Bytes per second in buckets of at most ~240 points from the API's per-minute/hour totals.
function series(points, step, since, now) {
  const start = Math.floor(since / step) * step;
  const n = Math.max(1, Math.floor((now - start) / step) + 1);
  const k = Math.ceil(n / 240), m = Math.ceil(n / k), width = step * k;
  const ins = new Array(m).fill(0), outs = new Array(m).fill(0);
  for (const p of points) {
    const i = Math.floor((p.ts - start) / width);
    if (i >= 0 && i < m) { ins[i] += p.bytes_in / width; outs[i] += p.bytes_out / width; }
  }
  return { start, width, ins, outs };
}

const charts = new Map();  // container -> last drawing's arguments, redrawn on resize
function drawChart(container, data, since) {
  charts.set(container, { data, since });
  const now = Date.now() / 1000;
  const { start, width: bw, ins, outs } = series(data.points, data.step, since, now);
  const W = Math.max(240, container.clientWidth || 600), H = W < 500 ? 180 : 220;
  const L = 68, R = 12, T = 12, B = 28, pw = W - L - R, ph = H - T - B;
  const peak = Math.max(...ins, ...outs);
  const tick = niceStep(Math.max(peak, 4) / 4), top = tick * Math.max(1, Math.ceil(peak / tick));
  const x = (t) => L + ((t - since) / Math.max(1, now - since)) * pw;
  const y = (v) => T + ph - (v / top) * ph;
  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg" });
  svg.append(s("title", {}, "bytes per second, in and out"));
  const yAxis = s("g", { class: "axis axis-y" }), xAxis = s("g", { class: "axis axis-x" });
  for (let v = 0; v <= top + tick / 2; v += tick) {
    yAxis.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: v ? "grid" : "base" }));
    yAxis.append(s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, rate(v)));
  }
  const span = now - since, ticks = W < 500 ? 3 : 6;
  const fmt = span > 2 * 86400 ? { weekday: "short", hour: "2-digit", minute: "2-digit" } : { hour: "2-digit", minute: "2-digit" };
  for (let i = 0; i <= ticks; i++) {
    const t = since + (span * i) / ticks, px = x(t);
    xAxis.append(s("line", { x1: px, x2: px, y1: T + ph, y2: T + ph + 4, class: "base" }));
    const anchor = i === 0 ? "start" : i === ticks ? "end" : "middle";
    xAxis.append(s("text", { x: px, y: H - 8, "text-anchor": anchor }, new Date(t * 1000).toLocaleString([], fmt)));
  }
  xAxis.append(s("line", { x1: L, x2: L, y1: T, y2: T + ph, class: "base" }));
  svg.append(yAxis, xAxis);
  const line = (arr) => arr.map((v, i) => `${x(Math.max(since, start + i * bw + bw / 2)).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  svg.append(s("polyline", { class: "line-in", points: line(ins) }), s("polyline", { class: "line-out", points: line(outs) }));
  const legend = h("div", { class: "legend" },
    h("span", { class: "legend-in" }, h("i"), "in: visitors → lab"),
    h("span", { class: "legend-out" }, h("i"), "out: lab → visitors"),
    h("span", { class: "muted legend-unit" }, `bytes/s, averaged over ${bw >= 3600 ? bw / 3600 + " h" : bw / 60 + " min"}`));
  container.replaceChildren(svg, legend);
}
let resizeTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { for (const [c, a] of charts) if (c.isConnected && c.offsetParent) drawChart(c, a.data, a.since); }, 100);
});

function spark(points, step, since, w = 120, hgt = 24) {
  const { ins, outs } = series(points, step, since, Date.now() / 1000);
  const max = Math.max(1e-9, ...ins, ...outs), n = ins.length;
  const line = (arr) => arr.map((v, i) => `${((i / Math.max(1, n - 1)) * w).toFixed(1)},${(hgt - (v / max) * (hgt - 4) - 2).toFixed(1)}`).join(" ");
  return s("svg", { viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none" },
    s("polyline", { class: "line-in", points: line(ins) }), s("polyline", { class: "line-out", points: line(outs) }));
}

// --- pages and routing ------------------------------------------------------------------------

const pages = ["overview", "clients", "tunnels", "tunnel"];
function route() {
  const m = location.hash.match(/^#\/tunnel\/([^/]+)\/([^/]+)\/?$/);
  if (m) {
    try { return { page: "tunnel", client: decodeURIComponent(m[1]), name: decodeURIComponent(m[2]) }; } catch (_) { /* bad escape */ }
  }
  const p = location.pathname.slice(1);
  return { page: pages.includes(p) && p !== "tunnel" ? p : "overview" };
}
let lastRoute = "";
function show() {
  const r = route();
  for (const p of pages) $("page-" + p).hidden = p !== r.page;
  for (const a of document.querySelectorAll("nav a[data-page]")) {
    a.classList.toggle("active", a.dataset.page === (r.page === "tunnel" ? "tunnels" : r.page));
  }
  const key = JSON.stringify(r);
  if (key !== lastRoute && r.page === "tunnel") { clearTunnelPage(r); window.scrollTo(0, 0); }
  lastRoute = key;
  refresh();
}
for (const a of document.querySelectorAll("nav a[data-page]")) {
  a.addEventListener("click", (e) => { e.preventDefault(); history.pushState({}, "", a.href); show(); });
}
$("tunnel-back").addEventListener("click", (e) => { e.preventDefault(); history.pushState({}, "", "/tunnels"); show(); });
window.addEventListener("popstate", show);
window.addEventListener("hashchange", show);

// --- overview ---------------------------------------------------------------------------------

const ovRange = { range: 3600 };
rangeButtons($("ov-ranges"), ovRange, () => refreshOverview().catch(console.warn));
async function refreshOverview() {
  const o = await api("GET", "/api/v1/overview");
  $("ov-clients").textContent = `${o.clients_online} / ${o.clients_total}`;
  $("ov-tunnels").textContent = `${o.tunnels_active} / ${o.tunnels_total}`;
  $("ov-conns").textContent = String(o.conns_open);
  $("ov-bytes").textContent = `${bytes(o.bytes_in)} / ${bytes(o.bytes_out)}`;
  $("ov-fp").textContent = o.fingerprint || "(TLS off)";
  const nodes = await api("GET", "/api/v1/nodes");
  fill($("nodes-table").tBodies[0], nodes.map(n => h("tr", { dataset: { node: n.addr } },
    h("td", {}, n.addr, n.this ? h("span", { class: "muted" }, " (this node)") : null),
    h("td", {}, n.heartbeat_age < 10 ? h("span", { class: "ok" }, "up") : h("span", { class: "error" }, `no heartbeat for ${Math.round(n.heartbeat_age)} s`)),
    h("td", {}, n.clients.join(", ")))));
  const range = ovRange.range, since = Date.now() / 1000 - range;
  const t = await api("GET", `/api/v1/traffic?since=${Math.floor(since)}`);
  if (range === ovRange.range) drawChart($("ov-chart"), t, since);
}

// --- clients ----------------------------------------------------------------------------------

let clientsCache = [];
async function refreshClients() {
  clientsCache = await api("GET", "/api/v1/clients");
  fill($("clients-table").tBodies[0], clientsCache.map(c => {
    const status = c.online ? h("span", { class: "ok" }, "online") : c.enabled ? "offline" : h("span", { class: "error" }, "disabled");
    const dash = c.source === "dashboard";
    const btn = (act, label, cls = "plain") => h("button", { type: "button", class: cls, dataset: { act, name: c.name } }, label);
    return h("tr", { dataset: { client: c.name } },
      h("td", { class: "wrap" }, c.name), h("td", {}, status), h("td", {}, c.remote_addr || ""), h("td", {}, c.version || ""),
      h("td", {}, ago(c.last_seen)),
      h("td", { class: "actions" }, dash ? btn(c.enabled ? "disable" : "enable", c.enabled ? "Disable" : "Enable") : null,
        dash ? btn("rotate", "Rotate token") : null, c.online ? btn("kick", "Kick") : null, dash ? btn("delete", "Delete", "danger") : null));
  }));
  const sel = $("tunnel-client"), keep = sel.value;
  sel.replaceChildren(...clientsCache.map(c => h("option", { value: c.name }, c.name)));
  if (keep) sel.value = keep;
}
async function refreshBlocks() {
  const list = await api("GET", "/api/v1/blocks");
  // every value here came from a peer (its address, the client name it sent): text only
  fill($("blocks-table").tBodies[0], list.map(b => h("tr", { dataset: { kind: b.kind, value: b.value, scope: b.scope } },
    h("td", {}, b.kind), h("td", { class: "wrap" }, b.value), h("td", {}, b.scope), h("td", {}, String(Number(b.failures))),
    h("td", {}, new Date(b.until * 1000).toLocaleString()), h("td", {}, b.address || ""),
    h("td", {}, h("button", { type: "button", class: "plain", dataset: { kind: b.kind, value: b.value } }, "Unblock")))));
  $("blocks-table").hidden = !list.length; $("blocks-empty").hidden = !!list.length;
}
$("blocks-table").addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-kind]"); if (!b) return;
  try {
    await api("DELETE", `/api/v1/blocks/${enc(b.dataset.kind)}/${enc(b.dataset.value)}`);
    $("block-error").textContent = "";
  } catch (err) { $("block-error").textContent = err.message; }
  refresh();
});
function showNewClient(r) {  // the one-time token and a ready relayc.toml, with copy buttons
  $("new-client-name").textContent = r.name;
  $("new-client-token").textContent = r.token;
  $("new-client-toml").textContent = r.relayc_toml;
  $("copy-status").textContent = "";
  $("new-client").hidden = false;
}
$("clients-table").addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-act]"); if (!b) return;
  const name = enc(b.dataset.name), act = b.dataset.act;
  try {
    if (act === "disable" || act === "enable") await api("PATCH", `/api/v1/clients/${name}`, { enabled: act === "enable" });
    if (act === "kick") await api("POST", `/api/v1/clients/${name}/kick`);
    if (act === "delete" && confirm(`Delete client ${b.dataset.name} and its dashboard tunnels?`)) await api("DELETE", `/api/v1/clients/${name}`);
    if (act === "rotate") showNewClient(await api("POST", `/api/v1/clients/${name}/rotate`));
    $("client-error").textContent = "";
  } catch (err) { $("client-error").textContent = err.message; }
  refresh();
});
$("add-client").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    showNewClient(await api("POST", "/api/v1/clients", { name: $("client-name").value }));
    $("client-name").value = ""; $("client-error").textContent = "";
  } catch (err) { $("client-error").textContent = err.message; }
  refresh();
});

// Copy: the Clipboard API where the page may use it (https, or the loopback), else the text is
// selected and copied the old way (or left selected for Ctrl+C).
async function copyText(id) {
  const node = $(id), text = node.textContent, status = $("copy-status");
  const what = id === "new-client-token" ? "token" : "relayc.toml";
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = `Copied the ${what}.`;
  } catch (_) {
    const range = document.createRange(); range.selectNodeContents(node);
    const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    status.textContent = ok ? `Copied the ${what}.` : `The ${what} is selected: press Ctrl+C (⌘C) to copy it.`;
  }
}
for (const b of document.querySelectorAll("button[data-copy]")) b.addEventListener("click", () => copyText(b.dataset.copy));

// --- tunnel fields: one generator for the add form's "More options" and the edit form ----------

let allFields = [];
const BASIC = new Set(["name", "type", "local_ip", "local_port", "remote_port", "subdomain", "custom_domains"]);
async function loadTunnelFields() {
  allFields = await api("GET", "/api/v1/tunnel-fields");
  $("tunnel-extra").replaceChildren(...allFields.filter(f => !BASIC.has(f.name)).map(f => fieldInput(f, null)));
  showKindFields();
}
// A labelled input for one field; ``value`` (edit form) prefills it, secrets excepted (write-only).
function fieldInput(f, item) {
  const editing = item !== null, value = editing ? item[f.name] : undefined;
  const common = { dataset: { field: f.name, type: f.type }, title: f.label || f.name, name: f.name };
  const label = (cls, ...kids) => h("label", { class: cls, dataset: { kinds: f.kinds.join(" "), forField: f.name } }, ...kids,
    editing ? h("span", { class: "field-error error" }) : null);
  if (f.choices) {  // a closed set of values: a select, "" first (the default: off)
    const sel = h("select", { ...common, dataset: { ...common.dataset, type: "str" } },
      ["", ...f.choices].map(c => h("option", { value: c }, c || "(none)")));
    if (editing) sel.value = value == null ? "" : String(value);
    return label("", f.name, sel);
  }
  if (f.type === "bool") {
    return label("check", h("input", { ...common, type: "checkbox", checked: editing ? !!value : false }), f.name);
  }
  const type = f.secret ? "password" : f.type === "int" && f.name !== "bandwidth_limit" ? "number" : "text";
  const hint = f.type === "list" ? " (comma-separated)" : "";
  const input = h("input", { ...common, type, autocomplete: f.secret ? "new-password" : "off",
    placeholder: editing && f.secret ? "unchanged (write-only)" : (f.label || f.name) + hint });
  if (editing && !f.secret) input.value = shown(value);
  if (editing && f.secret) {
    return label("", f.name, input, h("span", { class: "check muted" },
      h("input", { type: "checkbox", dataset: { clear: f.name } }), "remove"));
  }
  return label("", f.name, input);
}
function shown(v) { return v === null || v === undefined ? "" : Array.isArray(v) ? v.join(", ") : String(v); }
function parsed(input, f) {
  const type = input.dataset.type;
  if (type === "bool") return input.checked;
  const v = input.value.trim();
  if (type === "list") return v.split(",").map(x => x.trim()).filter(Boolean);
  if (type === "int") return v === "" ? (f ? f.default : 0) : /^\d+$/.test(v) ? Number(v) : v;
  return v;
}
function showKindFields() {
  const kind = $("tunnel-type").value;
  const byPort = kind === "tcp" || kind === "udp";
  $("tunnel-remote-port").hidden = !byPort; $("tunnel-domain").hidden = byPort || kind === "secret";
  for (const label of $("tunnel-extra").querySelectorAll("label[data-kinds]")) label.hidden = !label.dataset.kinds.split(" ").includes(kind);
}
$("tunnel-type").addEventListener("change", showKindFields);
$("add-tunnel").addEventListener("submit", async (e) => {
  e.preventDefault();
  const target = $("tunnel-target").value.trim();
  const cut = target.lastIndexOf(":");
  const body = { client: $("tunnel-client").value, name: $("tunnel-name").value, type: $("tunnel-type").value,
    local_ip: cut > 0 ? target.slice(0, cut).replace(/^\[|\]$/g, "") : "127.0.0.1", local_port: Number(cut > 0 ? target.slice(cut + 1) : target) };
  if (body.type === "tcp" || body.type === "udp") body.remote_port = Number($("tunnel-remote-port").value || 0);
  else if (body.type !== "secret") {
    const d = $("tunnel-domain").value.trim(); if (d.includes(".")) body.custom_domains = [d]; else body.subdomain = d;
  }
  for (const input of $("tunnel-extra").querySelectorAll("[data-field]")) {
    if (input.closest("label").hidden) continue;
    if (input.dataset.type === "bool") { if (input.checked) body[input.dataset.field] = true; continue; }
    if (!input.value.trim()) continue;
    body[input.dataset.field] = parsed(input, null);
  }
  try {
    await api("POST", "/api/v1/tunnels", body); $("tunnel-error").textContent = ""; $("tunnel-name").value = "";
    for (const input of $("tunnel-extra").querySelectorAll("[data-field]")) { input.value = ""; input.checked = false; }
  }
  catch (err) { $("tunnel-error").textContent = err.message; }
  refresh();
});

// --- editing a dashboard tunnel ---------------------------------------------------------------

let editing = null;  // the tunnel item being edited
function openEdit(item) {
  editing = item;
  $("edit-key").textContent = `${item.client}/${item.name}`;
  $("edit-type").textContent = item.type;
  $("edit-error").textContent = "";
  const fields = allFields.filter(f => f.name !== "name" && f.name !== "type" && f.kinds.includes(item.type));
  $("edit-fields").replaceChildren(...fields.map(f => fieldInput(f, item)));
  const dialog = $("edit-dialog");
  if (!dialog.open) dialog.showModal();
}
function editChanges() {
  const body = {};
  for (const f of allFields) {
    const input = $("edit-fields").querySelector(`[data-field="${CSS.escape(f.name)}"]`);
    if (!input) continue;
    if (f.secret) {
      const clear = $("edit-fields").querySelector(`[data-clear="${CSS.escape(f.name)}"]`);
      if (clear && clear.checked) body[f.name] = "";
      else if (input.value !== "") body[f.name] = input.value;
      continue;
    }
    const value = parsed(input, f), before = editing[f.name];
    if (f.type === "bool" ? value !== !!before : shown(value) !== shown(before)) body[f.name] = value;
  }
  return body;
}
function markFieldErrors(err) {
  for (const l of $("edit-fields").querySelectorAll("label")) { l.classList.remove("invalid"); l.querySelector(".field-error").textContent = ""; }
  const named = [];
  if (Array.isArray(err.detail)) {
    for (const d of err.detail) { const key = (d.loc || [])[1]; if (key) named.push([String(key), d.msg]); }
  } else if (typeof err.detail === "string") {
    for (const f of allFields) if (new RegExp(`\\b${f.name}\\b`).test(err.detail)) named.push([f.name, err.detail]);
  }
  for (const [key, msg] of named) {
    const label = $("edit-fields").querySelector(`label[data-for-field="${CSS.escape(key)}"]`);
    if (label) { label.classList.add("invalid"); label.querySelector(".field-error").textContent = msg; }
  }
}
$("edit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!editing) return;
  const body = editChanges();
  if (!Object.keys(body).length) { $("edit-error").textContent = "Nothing changed."; return; }
  $("edit-save").disabled = true;
  try {
    await api("PATCH", tunnelPath(editing.client, editing.name), body);
    $("edit-error").textContent = "";
    $("edit-dialog").close();
    editing = null;
  } catch (err) {
    $("edit-error").textContent = err.status === 409 ? `Not changed: ${err.message}` : err.message;
    markFieldErrors(err);
  } finally { $("edit-save").disabled = false; }
  refresh();
});
$("edit-fields").addEventListener("input", (e) => {  // a field being corrected is no longer marked
  const label = e.target.closest("label.invalid");
  if (label) { label.classList.remove("invalid"); label.querySelector(".field-error").textContent = ""; }
});
$("edit-cancel").addEventListener("click", () => { $("edit-dialog").close(); editing = null; });

// --- tunnels ----------------------------------------------------------------------------------

let tunnelsCache = [];
const sparks = {};
function stateCell(t) {
  const down = t.state === "service down";
  return [t.status === "active" ? h("span", { class: "ok" }, "active") : h("span", { class: down ? "error down" : "error" }, t.status),
    t.health === "up" ? h("span", { class: "ok", title: "health check passes" }, " ✓") : null,
    t.pending_edit ? h("div", { class: t.edit_error ? "error edit-pending" : "muted edit-pending" },
      t.edit_error ? `last edit not applied: ${t.edit_error}` : "last edit being applied…") : null];
}
async function refreshTunnels() {
  const list = tunnelsCache = await api("GET", "/api/v1/tunnels");
  const since = Date.now() / 1000 - 3600;
  fill($("tunnels-table").tBodies[0], list.map(t => {
    const key = `${t.client}/${t.name}`, dash = t.source === "dashboard";
    const btn = (act, label, cls = "plain") => h("button", { type: "button", class: cls, dataset: { act, client: t.client, name: t.name } }, label);
    const sp = sparks[key];
    return h("tr", { dataset: { tunnel: key } },
      h("td", { class: "wrap" }, t.client),
      h("td", { class: "wrap" }, h("a", { href: tunnelHref(t.client, t.name), class: "tunnel-link" }, t.name), " ", h("span", { class: "muted" }, t.type)),
      h("td", { class: "state" }, stateCell(t)),
      h("td", { class: "wrap" }, t.public || "", t.group ? h("span", { class: "muted" }, ` group ${t.group}`) : null),
      h("td", {}, `${t.local_ip}:${t.local_port}`), h("td", { class: "bytes-in" }, bytes(t.bytes_in)),
      h("td", { class: "bytes-out" }, bytes(t.bytes_out)), h("td", {}, `${t.conns_open} / ${t.conns_total}`),
      h("td", { class: "since" }, utcText(t.totals_since)), h("td", { class: "spark" }, sp ? spark(sp.points, sp.step, sp.since) : null),
      h("td", { class: "actions" }, dash ? [btn("edit", "Edit"), btn(t.enabled ? "disable" : "enable", t.enabled ? "Disable" : "Enable"), btn("delete", "Delete", "danger")]
        : h("span", { class: "tag", title: "defined in the client's relayc.toml: read-only here" }, "relayc.toml")));
  }));
  for (const t of list.filter(t => t.state === "active" || t.state === "service down")) {
    api("GET", `/api/v1/traffic?client=${enc(t.client)}&tunnel=${enc(t.name)}&since=${Math.floor(since)}`)
      .then(r => { sparks[`${t.client}/${t.name}`] = { ...r, since }; }, () => {});
  }
  if (!clientsCache.length) await refreshClients();
  if (!allFields.length) await loadTunnelFields();
  await refreshCertificates();
}
async function refreshCertificates() {
  const certs = await api("GET", "/api/v1/certificates");
  $("certs-card").hidden = !certs.length;
  fill($("certs-table").tBodies[0], certs.map(c => h("tr", { dataset: { domain: c.domain } },
    h("td", { class: "wrap" }, c.domain), h("td", {}, c.source),
    h("td", { class: "until" }, c.not_after ? utcText(c.not_after) : h("span", { class: "muted" }, "pending")),
    h("td", {}, c.issuer || ""), h("td", { class: "wrap" }, c.last_error ? h("span", { class: "error" }, c.last_error) : ""))));
}
async function tunnelAction(b, errorId) {
  const { act, client, name } = b.dataset, path = tunnelPath(client, name);
  try {
    if (act === "edit") {
      if (!allFields.length) await loadTunnelFields();
      const item = tunnelsCache.find(t => t.client === client && t.name === name);
      if (item) openEdit(item);
      return;
    }
    if (act === "delete" && confirm(`Delete tunnel ${client}/${name}?`)) await api("DELETE", path);
    if (act === "disable" || act === "enable") await api("PATCH", path, { enabled: act === "enable" });
    $(errorId).textContent = "";
  } catch (err) { $(errorId).textContent = err.message; }
  refresh();
}
$("tunnels-table").addEventListener("click", (e) => {
  const b = e.target.closest("button[data-act]"); if (b) tunnelAction(b, "tunnel-error");
});

// --- a tunnel's own page ----------------------------------------------------------------------

const tpRange = { range: 3600 };
rangeButtons($("tp-ranges"), tpRange, () => refreshTunnelPage().catch(console.warn));
function clearTunnelPage(r) {
  $("tp-title").textContent = `${r.client}/${r.name}`;
  for (const id of ["tp-type", "tp-health", "tp-error"]) $(id).textContent = "";
  for (const id of ["tp-facts", "tp-chart", "tp-refusals"]) $(id).replaceChildren();
  fill($("conns-table").tBodies[0], []);
  $("tp-edit").hidden = true; $("tp-readonly").hidden = true;
}
$("tp-edit").addEventListener("click", () => tunnelAction($("tp-edit"), "tp-error"));
async function refreshTunnelPage() {
  const r = route(); if (r.page !== "tunnel") return;
  const [list] = await Promise.all([api("GET", "/api/v1/tunnels"), allFields.length ? null : loadTunnelFields()]);
  tunnelsCache = list;
  const t = list.find(x => x.client === r.client && x.name === r.name);
  if (!t) {
    $("tp-health").className = "health bad";
    $("tp-health").textContent = `No tunnel ${r.client}/${r.name} (deleted, or its client is offline).`;
    return;
  }
  $("tp-type").textContent = t.type;
  const dash = t.source === "dashboard";
  $("tp-readonly").hidden = dash; $("tp-edit").hidden = !dash;
  Object.assign($("tp-edit").dataset, { act: "edit", client: t.client, name: t.name });
  // health: "service down" shows as such, in red
  const health = $("tp-health");
  if (t.state === "service down") {
    health.className = "health bad";
    const why = t.health_error || (t.status.startsWith("service down:") ? t.status.slice(13).trim() : "");
    health.textContent = `Service down: relayc cannot reach ${t.local_ip}:${t.local_port}${why ? ` (${why})` : ""}.`;
  } else if (t.state === "active") {
    health.className = "health good";
    health.textContent = t.health === "up" ? "Active: the health check reaches the service." : "Active.";
  } else {
    health.className = "health warn";
    health.textContent = t.status;
  }
  if (t.pending_edit) {
    health.append(h("div", { class: "edit-pending" }, t.edit_error
      ? `The last edit is not applied (the old definition still serves): ${t.edit_error}`
      : "The last edit is being applied…"));
  }
  const facts = [["Client", t.client], ["Name", t.name], ["Kind", t.type],
    ["Defined in", dash ? "the dashboard (editable)" : "the client's relayc.toml (read-only here)"], ["State", t.status],
    ["Public", t.public || "–"], ["Target", `${t.local_ip}:${t.local_port}`],
    ["Bytes in / out", `${bytes(t.bytes_in)} / ${bytes(t.bytes_out)}`],
    ["Connections open / total", `${t.conns_open} / ${t.conns_total}`], ["Counting since", utcText(t.totals_since) || "–"]];
  for (const f of allFields) {  // the settings that differ from their defaults
    if (BASIC.has(f.name) || f.secret || !(f.name in t) || !f.kinds.includes(t.type)) continue;
    if (shown(t[f.name]) !== shown(f.default)) facts.push([f.name, shown(t[f.name])]);
  }
  $("tp-facts").replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { fact: k } }, v)]));
  const refusedTunnel = t.state === "refused" || t.reason
    ? h("p", { class: "error refusal" }, `relayd refused this tunnel (${t.reason || "refused"}): `, t.status.replace(/^refused:\s*/, ""))
    : h("p", { class: "muted" }, "relayd has not refused this tunnel.");
  const range = tpRange.range, since = Date.now() / 1000 - range;
  const [traffic, conns, turned] = await Promise.all([
    api("GET", `/api/v1/traffic?client=${enc(t.client)}&tunnel=${enc(t.name)}&since=${Math.floor(since)}`),
    api("GET", `${tunnelPath(t.client, t.name)}/connections`).catch(err => err),
    api("GET", `${tunnelPath(t.client, t.name)}/refusals`).catch(() => [])]);
  if (range === tpRange.range && route().page === "tunnel") drawChart($("tp-chart"), traffic, since);
  // visitors this tunnel turned away lately (not in allow_sources, max_connections reached, ...)
  $("tp-refusals").replaceChildren(refusedTunnel, ...(turned.length ? [
    h("p", { class: "muted" }, `Visitors turned away lately (the last ${turned.length}, newest first):`),
    h("div", { class: "table-wrap" }, h("table", { id: "visitor-refusals" },
      h("thead", {}, h("tr", {}, h("th", {}, "When"), h("th", {}, "Visitor"), h("th", {}, "Why"))),
      h("tbody", {}, ...turned.map(r => h("tr", { class: "visitor-refusal" }, h("td", {}, timeText(r.at)),
        h("td", { class: "addr wrap" }, r.addr), h("td", { class: "wrap" }, r.text))))))]
    : [h("p", { class: "muted" }, "No visitor turned away lately.")]));
  if (conns instanceof Error) {
    $("tp-conns-note").textContent = `Connections are not available: ${conns.message}`;
    return;
  }
  $("tp-conns-note").textContent = "The last 100 visitor connections, newest first.";
  fill($("conns-table").tBodies[0], conns.map(c => h("tr", { class: c.closed == null ? "conn open" : "conn" },
    h("td", { class: "addr wrap" }, c.addr), h("td", {}, timeText(c.opened)),
    h("td", {}, c.closed == null ? h("span", { class: "ok" }, "open") : timeText(c.closed)),
    h("td", { class: "bytes-in" }, bytes(c.bytes_in)), h("td", { class: "bytes-out" }, bytes(c.bytes_out)))));
  $("conns-empty").hidden = conns.length > 0;
}

async function refresh() {
  try {
    const page = route().page;
    if (page === "overview") await refreshOverview();
    if (page === "clients") { await refreshClients(); await refreshBlocks(); }
    if (page === "tunnels") await refreshTunnels();
    if (page === "tunnel") await refreshTunnelPage();
  } catch (err) { console.warn(err); }
}
show();
setInterval(refresh, 2000);
