"use strict";
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const opts = { method, headers: { "X-CSRF-Token": csrf } };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  const data = r.status === 204 ? null : await r.json();
  if (!r.ok) {
    const d = data && data.detail;
    const msg = Array.isArray(d) ? d.map(e => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ") : d;
    throw new Error(msg || r.statusText);
  }
  return data;
}

function bytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? "now" : s < 3600 ? Math.floor(s / 60) + " min ago" : Math.floor(s / 3600) + " h ago";
}
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

function chart(points, step, since, w = 600, h = 160) {
  const start = Math.floor(since / step) * step;
  const n = Math.floor((Date.now() / 1000 - start) / step) + 1;  // up to and including the current bucket
  const ins = new Array(n).fill(0), outs = new Array(n).fill(0);
  for (const p of points) { const i = Math.floor((p.ts - start) / step); if (i >= 0 && i < n) { ins[i] += p.bytes_in; outs[i] += p.bytes_out; } }
  const max = Math.max(1, ...ins, ...outs);
  const line = (arr) => arr.map((v, i) => `${(i / Math.max(1, n - 1)) * w},${h - (v / max) * (h - 4) - 2}`).join(" ");
  return `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none"><polyline fill="none" stroke="#2f6fde" stroke-width="2" points="${line(ins)}"/>` +
    `<polyline fill="none" stroke="#1e8a4c" stroke-width="2" points="${line(outs)}"/></svg>`;
}

const pages = ["overview", "clients", "tunnels"];
function show(page) {
  for (const p of pages) { $("page-" + p).hidden = p !== page; $("nav-" + p).classList.toggle("active", p === page); }
  refresh();
}
for (const a of document.querySelectorAll("nav a[data-page]")) {
  a.addEventListener("click", (e) => { e.preventDefault(); history.pushState({}, "", a.href); show(a.dataset.page); });
}
window.addEventListener("popstate", () => show(current()));
function current() { const p = location.pathname.slice(1); return pages.includes(p) ? p : "overview"; }

async function refreshOverview() {
  const o = await api("GET", "/api/v1/overview");
  $("ov-clients").textContent = `${o.clients_online} / ${o.clients_total}`;
  $("ov-tunnels").textContent = `${o.tunnels_active} / ${o.tunnels_total}`;
  $("ov-conns").textContent = o.conns_open;
  $("ov-bytes").textContent = `${bytes(o.bytes_in)} / ${bytes(o.bytes_out)}`;
  $("ov-fp").textContent = o.fingerprint || "(TLS off)";
  const nodes = await api("GET", "/api/v1/nodes");
  $("nodes-table").tBodies[0].innerHTML = nodes.map(n => {
    const health = n.heartbeat_age < 10 ? '<span class="ok">up</span>' : `<span class="error">no heartbeat for ${Math.round(n.heartbeat_age)} s</span>`;
    return `<tr data-node="${esc(n.addr)}"><td>${esc(n.addr)}${n.this ? ' <span class="muted">(this node)</span>' : ""}</td>` +
      `<td>${health}</td><td>${esc(n.clients.join(", "))}</td></tr>`;
  }).join("");
  const since = Date.now() / 1000 - Number($("ov-range").value);
  const t = await api("GET", `/api/v1/traffic?since=${since}`);
  $("ov-chart").innerHTML = chart(t.points, t.step, since);
}
$("ov-range").addEventListener("change", refreshOverview);

let clientsCache = [];
async function refreshClients() {
  clientsCache = await api("GET", "/api/v1/clients");
  const rows = clientsCache.map(c => {
    const status = c.online ? '<span class="ok">online</span>' : (c.enabled ? "offline" : '<span class="error">disabled</span>');
    const dash = c.source === "dashboard";
    const btn = (act, label, cls = "plain") => `<button class="${cls}" data-act="${act}" data-name="${esc(c.name)}">${label}</button>`;
    const actions = (dash ? btn(c.enabled ? "disable" : "enable", c.enabled ? "Disable" : "Enable") + btn("rotate", "Rotate token") : "") +
      (c.online ? btn("kick", "Kick") : "") + (dash ? btn("delete", "Delete", "danger") : "");
    return `<tr data-client="${esc(c.name)}"><td>${esc(c.name)}</td><td>${status}</td><td>${esc(c.remote_addr || "")}</td>` +
      `<td>${esc(c.version || "")}</td><td>${ago(c.last_seen)}</td><td>${actions}</td></tr>`;
  });
  $("clients-table").tBodies[0].innerHTML = rows.join("");
  const sel = $("tunnel-client"), keep = sel.value;
  sel.innerHTML = clientsCache.map(c => `<option>${esc(c.name)}</option>`).join("");
  if (keep) sel.value = keep;
}
async function refreshBlocks() {
  const list = await api("GET", "/api/v1/blocks");
  const rows = list.map(b => {
    // every value here came from a peer (its address, the client name it sent): escaped
    const until = new Date(b.until * 1000).toLocaleString();
    return `<tr data-kind="${esc(b.kind)}" data-value="${esc(b.value)}" data-scope="${esc(b.scope)}"><td>${esc(b.kind)}</td>` +
      `<td>${esc(b.value)}</td><td>${esc(b.scope)}</td><td>${Number(b.failures)}</td><td>${esc(until)}</td>` +
      `<td>${esc(b.address || "")}</td><td><button class="plain" data-kind="${esc(b.kind)}" data-value="${esc(b.value)}">Unblock</button></td></tr>`;
  });
  $("blocks-table").tBodies[0].innerHTML = rows.join("");
  $("blocks-table").hidden = !rows.length; $("blocks-empty").hidden = !!rows.length;
}
$("blocks-table").addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-kind]"); if (!b) return;
  try {
    await api("DELETE", `/api/v1/blocks/${encodeURIComponent(b.dataset.kind)}/${encodeURIComponent(b.dataset.value)}`);
    $("block-error").textContent = "";
  } catch (err) { $("block-error").textContent = err.message; }
  refresh();
});
$("clients-table").addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-act]"); if (!b) return;
  const name = encodeURIComponent(b.dataset.name), act = b.dataset.act;
  try {
    if (act === "disable" || act === "enable") await api("PATCH", `/api/v1/clients/${name}`, { enabled: act === "enable" });
    if (act === "kick") await api("POST", `/api/v1/clients/${name}/kick`);
    if (act === "delete" && confirm(`Delete client ${b.dataset.name} and its dashboard tunnels?`)) await api("DELETE", `/api/v1/clients/${name}`);
    if (act === "rotate") {
      const r = await api("POST", `/api/v1/clients/${name}/rotate`);
      $("new-client-toml").textContent = r.relayc_toml; $("new-client").hidden = false;
    }
    $("client-error").textContent = "";
  } catch (err) { $("client-error").textContent = err.message; }
  refresh();
});
$("add-client").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const r = await api("POST", "/api/v1/clients", { name: $("client-name").value });
    $("new-client-toml").textContent = r.relayc_toml; $("new-client").hidden = false;
    $("client-name").value = ""; $("client-error").textContent = "";
  } catch (err) { $("client-error").textContent = err.message; }
  refresh();
});

const sparks = {};
async function refreshTunnels() {
  const list = await api("GET", "/api/v1/tunnels");
  const since = Date.now() / 1000 - 3600;
  const rows = list.map(t => {
    const key = `${t.client}/${t.name}`;
    const state = t.status === "active" ? '<span class="ok">active</span>' : `<span class="error">${esc(t.status)}</span>`;
    const btn = (act, label, cls = "plain") => `<button class="${cls}" data-act="${act}" data-key="${esc(key)}">${label}</button>`;
    const actions = t.source === "dashboard" ? btn(t.enabled ? "disable" : "enable", t.enabled ? "Disable" : "Enable") + btn("delete", "Delete", "danger") : '<span class="muted">relayc.toml</span>';
    const group = t.group ? ` <span class="muted">group ${esc(t.group)}</span>` : "";
    const health = t.health === "up" ? ' <span class="ok" title="health check passes">&#10003;</span>' : "";
    return `<tr data-tunnel="${esc(key)}"><td>${esc(t.client)}</td><td>${esc(t.name)} <span class="muted">${esc(t.type)}</span></td>` +
      `<td class="state">${state}${health}</td><td>${esc(t.public || "")}${group}</td>` +
      `<td>${esc(t.local_ip)}:${t.local_port}</td><td class="bytes-in">${bytes(t.bytes_in)}</td><td class="bytes-out">${bytes(t.bytes_out)}</td>` +
      `<td>${t.conns_open} / ${t.conns_total}</td><td class="since">${sinceText(t.totals_since)}</td><td class="spark">${sparks[key] || ""}</td><td>${actions}</td></tr>`;
  });
  $("tunnels-table").tBodies[0].innerHTML = rows.join("");
  for (const t of list.filter(t => t.status === "active")) {
    const key = `${t.client}/${t.name}`;
    api("GET", `/api/v1/traffic?client=${encodeURIComponent(t.client)}&tunnel=${encodeURIComponent(t.name)}&since=${since}`)
      .then(s => { sparks[key] = chart(s.points, s.step, since, 120, 24); });
  }
  if (!clientsCache.length) await refreshClients();
  if (!extraFields.length) await loadTunnelFields();
  await refreshCertificates();
}
async function refreshCertificates() {
  const certs = await api("GET", "/api/v1/certificates");
  $("certs-card").hidden = !certs.length;
  $("certs-table").tBodies[0].innerHTML = certs.map(c => {
    const until = c.not_after ? sinceText(c.not_after) : '<span class="muted">pending</span>';
    const error = c.last_error ? `<span class="error">${esc(c.last_error)}</span>` : "";
    return `<tr data-domain="${esc(c.domain)}"><td>${esc(c.domain)}</td><td>${esc(c.source)}</td><td class="until">${until}</td>` +
      `<td>${esc(c.issuer || "")}</td><td>${error}</td></tr>`;
  }).join("");
}
$("tunnels-table").addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-act]"); if (!b) return;
  const [client, name] = b.dataset.key.split("/"); const path = `/api/v1/tunnels/${encodeURIComponent(client)}/${encodeURIComponent(name)}`;
  try {
    if (b.dataset.act === "delete" && confirm(`Delete tunnel ${b.dataset.key}?`)) await api("DELETE", path);
    if (b.dataset.act === "disable" || b.dataset.act === "enable") await api("PATCH", path, { enabled: b.dataset.act === "enable" });
    $("tunnel-error").textContent = "";
  } catch (err) { $("tunnel-error").textContent = err.message; }
  refresh();
});
function sinceText(ts) {
  return ts ? esc(new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ")) + " UTC" : "";
}
// Every other field of a tunnel, as relayd describes them (GET /api/v1/tunnel-fields): the form
// shows what relayc.toml's [[tunnels]] can hold, without listing the fields here.
const BASIC = new Set(["name", "type", "local_ip", "local_port", "remote_port", "subdomain", "custom_domains"]);
let extraFields = [];
async function loadTunnelFields() {
  extraFields = (await api("GET", "/api/v1/tunnel-fields")).filter(f => !BASIC.has(f.name));
  $("tunnel-extra").innerHTML = extraFields.map(f => {
    const label = `<label data-kinds="${esc(f.kinds.join(" "))}">${esc(f.name)}`;
    if (f.choices) {  // a closed set of values: a select, "" first (the default: off)
      const options = ["", ...f.choices].map(c => `<option value="${esc(c)}">${esc(c || "(none)")}</option>`).join("");
      return `${label}<select data-field="${esc(f.name)}" data-type="str" title="${esc(f.label)}">${options}</select></label>`;
    }
    if (f.type === "bool") {
      return `<label data-kinds="${esc(f.kinds.join(" "))}" class="check"><input data-field="${esc(f.name)}" ` +
        `data-type="bool" type="checkbox" title="${esc(f.label)}">${esc(f.name)}</label>`;
    }
    const type = f.secret ? "password" : f.type === "int" && f.name !== "bandwidth_limit" ? "number" : "text";
    const hint = f.type === "list" ? " (comma-separated)" : "";
    return `${label}<input data-field="${esc(f.name)}" ` +
      `data-type="${esc(f.type)}" type="${type}" placeholder="${esc(f.label + hint)}" autocomplete="off"></label>`;
  }).join("");
  showKindFields();
}
function showKindFields() {
  const kind = $("tunnel-type").value;
  const byPort = kind === "tcp" || kind === "udp";
  $("tunnel-remote-port").hidden = !byPort; $("tunnel-domain").hidden = byPort || kind === "secret";
  for (const label of $("tunnel-extra").querySelectorAll("label")) label.hidden = !label.dataset.kinds.split(" ").includes(kind);
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
    const type = input.dataset.type;
    if (input.closest("label").hidden) continue;
    if (type === "bool") { if (input.checked) body[input.dataset.field] = true; continue; }
    const v = input.value.trim();
    if (!v) continue;
    body[input.dataset.field] = type === "list" ? v.split(",").map(x => x.trim()).filter(Boolean)
      : type === "int" && /^\d+$/.test(v) ? Number(v) : v;
  }
  try {
    await api("POST", "/api/v1/tunnels", body); $("tunnel-error").textContent = ""; $("tunnel-name").value = "";
    for (const input of $("tunnel-extra").querySelectorAll("[data-field]")) { input.value = ""; input.checked = false; }
  }
  catch (err) { $("tunnel-error").textContent = err.message; }
  refresh();
});

async function refresh() {
  try {
    const page = current();
    if (page === "overview") await refreshOverview();
    if (page === "clients") { await refreshClients(); await refreshBlocks(); }
    if (page === "tunnels") await refreshTunnels();
  } catch (err) { console.warn(err); }
}
show(current());
setInterval(refresh, 2000);
