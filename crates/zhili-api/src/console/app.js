// Zhili's console: a small single-page app over the native API (/api/v1). Each view has its own
// URL under /ui; views stay live through blocking reads (index + wait), the stream tail through
// server-sent events read with fetch (so the token travels in a header), the rest by polling.
// The token lives in sessionStorage and is sent as a Bearer token; nothing leaves this origin.
"use strict";

const main = document.getElementById("main");
let token = sessionStorage.getItem("zhili-token") || "";
let view = null; // { abort: AbortController }

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const enc = encodeURIComponent;
const badge = (h) => `<span class="badge ${esc(h)}">${esc(h)}</span>`;
const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "");

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(method, path, body, signal, raw) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined && !raw) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : raw ? body : JSON.stringify(body) });
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!resp.ok) throw new ApiError(resp.status, (json && json.detail) || text || resp.statusText);
  return { json, index: Number(resp.headers.get("X-Zhili-Index") || 0) };
}

// Whether the token may do each of `checks` ([resource, name, access]); the console offers only
// what it may (the server checks again anyway).
async function can(checks) {
  try {
    const r = await api("POST", "/api/v1/acl/authorize", checks.map(([resource, name, access]) => ({ resource, name, access })));
    return r.json.map((a) => a.allow);
  } catch (_) { return checks.map(() => true); }
}
const offer = (allowed) => (allowed ? "" : 'disabled title="this token may not change this"');

const aborted = (e) => e && (e.name === "AbortError" || (view && view.abort.signal.aborted));
// A click handler on the page for as long as the current view lasts.
const onMain = (fn) => main.addEventListener("click", fn, { signal: view.abort.signal });
const sleep = (ms, signal) => new Promise((res) => { const t = setTimeout(res, ms); signal.addEventListener("abort", () => { clearTimeout(t); res(); }, { once: true }); });

// Runs `step(index)` (which does a blocking read from `index` and renders) until the view changes;
// a failed read is shown and retried after a pause.
async function live(step) {
  const signal = view.abort.signal;
  let index = 0;
  while (!signal.aborted) {
    try { index = (await step(index, signal)) || 0; }
    catch (e) {
      if (aborted(e)) return;
      if (e.status === 401 || e.status === 403) { denied(e); return; }
      showError(e);
      await sleep(2000, signal);
    }
  }
}

async function poll(ms, step) {
  const signal = view.abort.signal;
  while (!signal.aborted) {
    try { await step(signal); }
    catch (e) {
      if (aborted(e)) return;
      if (e.status === 401 || e.status === 403) { denied(e); return; }
      showError(e);
    }
    await sleep(ms, signal);
  }
}

function showError(e) {
  const box = document.getElementById("status");
  if (box) box.innerHTML = `<span class="error">${esc(e.message)}</span>`;
}

function denied(e) {
  if (!token && e.status !== 404) { go("/ui/login"); return; }
  main.innerHTML = `<h1>Not allowed</h1><p class="error">${esc(e.message)}</p><p>This token may not read this view. <a href="/ui/login">Use another token</a>.</p>`;
}

function go(path) {
  if (location.pathname + location.search !== path) history.pushState({}, "", path);
  route();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (!a || a.target || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin === location.origin && url.pathname.startsWith("/ui")) { ev.preventDefault(); go(url.pathname + url.search); }
});
window.addEventListener("popstate", () => route());

const views = [
  [/^\/ui\/?$/, overview],
  [/^\/ui\/login$/, login],
  [/^\/ui\/services$/, services],
  [/^\/ui\/services\/([^/]+)$/, service],
  [/^\/ui\/topology$/, topology],
  [/^\/ui\/kv(?:\/(.*))?$/, kv],
  [/^\/ui\/routes$/, routes],
  [/^\/ui\/streams(?:\/(.+))?$/, streams],
  [/^\/ui\/transactions(?:\/(.+))?$/, transactions],
  [/^\/ui\/plans(?:\/(.+))?$/, plans],
  [/^\/ui\/acl$/, acl],
];

function route() {
  if (view) view.abort.abort();
  view = { abort: new AbortController() };
  const path = location.pathname;
  document.querySelectorAll("nav a").forEach((a) => {
    const p = new URL(a.href).pathname;
    const current = p === "/ui/" ? path === "/ui" || path === "/ui/" : path.startsWith(p);
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
  for (const [re, fn] of views) {
    const m = path.match(re);
    if (m) {
      main.innerHTML = "";
      fn(...m.slice(1).map((x) => (x === undefined ? undefined : decodeURIComponent(x)))).catch((e) => { if (!aborted(e)) showPage("Error", `<p class="error">${esc(e.message)}</p>`); });
      main.focus({ preventScroll: true });
      return;
    }
  }
  showPage("Not found", `<p>No view at ${esc(path)}. <a href="/ui/">Overview</a></p>`);
}

function showPage(title, html) {
  document.title = `${title} · Zhili`;
  main.innerHTML = `<h1>${esc(title)}</h1><div id="status" role="status" aria-live="polite"></div>${html}`;
}

async function whoami() {
  const who = document.getElementById("who");
  if (!token) { who.innerHTML = `<a href="/ui/login">Log in</a>`; return; }
  try {
    const t = (await api("GET", "/api/v1/acl/token/self")).json;
    who.innerHTML = `token ${esc(t.description || t.accessor_id || "")} · <a href="/ui/login" id="logout">log out</a>`;
  } catch (_) { who.innerHTML = `<a href="/ui/login">Log in</a>`; }
}

// ---- views ---------------------------------------------------------------------------------

async function login() {
  showPage("Log in", `<p>Paste an ACL token (its secret). With <code>zhili server --dev</code> none is needed.</p>
    <form class="inline" id="login"><label for="token">Token</label><input id="token" type="password" autocomplete="off" size="40" required>
    <button type="submit">Log in</button><button type="button" class="secondary" id="anon">Continue without a token</button></form>`);
  sessionStorage.removeItem("zhili-token");
  token = "";
  whoami();
  document.getElementById("token").focus();
  document.getElementById("anon").onclick = () => go("/ui/");
  document.getElementById("login").onsubmit = async (ev) => {
    ev.preventDefault();
    token = document.getElementById("token").value.trim();
    try {
      await api("GET", "/api/v1/acl/token/self");
      sessionStorage.setItem("zhili-token", token);
      whoami();
      go("/ui/");
    } catch (e) {
      token = "";
      showError(new Error(`that token was refused: ${e.message}`));
    }
  };
}

async function overview() {
  showPage("Overview", `<div class="cards" id="cards"></div><h2>Recent changes</h2><div id="changes" class="table-wrap"></div>`);
  const recent = async () => {
    try {
      const r = await api("GET", "/api/v1/streams/%24registry?direction=backwards&limit=15", undefined, view.abort.signal);
      const rows = (r.json.events || []).map((e) => `<tr><td>${esc(e.event.time)}</td><td>${esc(e.event.type.replace("io.zhili.registry.", ""))}</td><td class="mono">${esc(e.event.subject)}</td></tr>`);
      document.getElementById("changes").innerHTML = `<table><thead><tr><th>time</th><th>change</th><th>subject</th></tr></thead><tbody>${rows.join("") || "<tr><td colspan=3 class=muted>none yet</td></tr>"}</tbody></table>`;
    } catch (e) {
      if (aborted(e)) return;
      document.getElementById("changes").innerHTML = `<p class="muted">${esc(e.status === 403 ? "this token may not read $registry" : e.message)}</p>`;
    }
  };
  await live(async (index, signal) => {
    const r = await api("GET", `/api/v1/services?index=${index}&wait=30s`, undefined, signal);
    const list = r.json;
    const inst = list.reduce((n, s) => n + s.instances, 0), ok = list.reduce((n, s) => n + s.passing, 0);
    document.getElementById("cards").innerHTML = `<div class="card">services<b>${list.length}</b></div><div class="card">instances<b>${inst}</b></div>
      <div class="card">passing<b class="ok">${ok}</b></div><div class="card">not passing<b class="${inst - ok ? "error" : ""}">${inst - ok}</b></div>`;
    recent();
    return r.index;
  });
}

async function services() {
  const q = new URLSearchParams(location.search);
  showPage("Services", `<form class="inline" id="filter" role="search">
    <label>Search <input name="q" value="${esc(q.get("q") || "")}"></label>
    <label>Tag <input name="tag" value="${esc(q.get("tag") || "")}" size="10"></label>
    <label>Health <select name="health"><option value="">any</option><option>passing</option><option>warning</option><option>critical</option></select></label>
    <label>Namespace <select name="namespace" id="ns"><option value="">default</option></select></label>
    <button type="submit">Filter</button></form><div class="table-wrap" id="list"></div>`);
  const form = document.getElementById("filter");
  form.health.value = q.get("health") || "";
  try {
    const ns = (await api("GET", "/api/v1/namespaces", undefined, view.abort.signal)).json;
    form.namespace.innerHTML = ns.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("") || `<option value="">default</option>`;
    form.namespace.value = q.get("namespace") || "default";
  } catch (_) { /* namespaces are a convenience */ }
  form.onsubmit = (ev) => { ev.preventDefault(); const p = new URLSearchParams(new FormData(form)); for (const [k, v] of [...p]) if (!v) p.delete(k); go(`/ui/services?${p}`); };
  const namespace = q.get("namespace") || "default";
  await live(async (index, signal) => {
    const r = await api("GET", `/api/v1/services?namespace=${enc(namespace)}&index=${index}&wait=30s`, undefined, signal);
    const text = (q.get("q") || "").toLowerCase(), tag = q.get("tag"), health = q.get("health");
    const rows = r.json
      .map((s) => ({ ...s, health: s.instances === 0 ? "empty" : s.passing === s.instances ? "passing" : s.passing === 0 ? "critical" : "warning" }))
      .filter((s) => (!text || s.name.toLowerCase().includes(text)) && (!tag || (s.tags || []).includes(tag)) && (!health || s.health === health))
      .map((s) => `<tr><td><a href="/ui/services/${enc(s.name)}?namespace=${enc(namespace)}">${esc(s.name)}</a></td><td>${badge(s.health)}</td>
        <td>${s.passing} / ${s.instances}</td><td>${esc((s.tags || []).join(", "))}</td></tr>`);
    document.getElementById("list").innerHTML = `<table><thead><tr><th>service</th><th>health</th><th>passing / instances</th><th>tags</th></tr></thead>
      <tbody>${rows.join("") || "<tr><td colspan=4 class=muted>no services match</td></tr>"}</tbody></table>`;
    return r.index;
  });
}

async function service(name) {
  const namespace = new URLSearchParams(location.search).get("namespace") || "default";
  showPage(`Service ${name}`, `<p class="muted">namespace ${esc(namespace)} · live</p><div id="breaker"></div><div class="table-wrap" id="instances"></div>
    <h2>Reports</h2><div id="reports" class="muted">none</div><h2>History</h2><div id="history" class="table-wrap"></div>`);
  const [writable] = await can([["service", name, "write"]]);
  const history = async () => {
    try {
      const r = await api("GET", "/api/v1/streams/%24registry?direction=backwards&limit=500", undefined, view.abort.signal);
      const mine = (r.json.events || []).filter((e) => (e.event.subject || "").startsWith(`${namespace}/${name}`)).slice(0, 20);
      document.getElementById("history").innerHTML = `<table><thead><tr><th>time</th><th>change</th><th>instance</th><th>health</th></tr></thead><tbody>${mine.map((e) =>
        `<tr><td>${esc(e.event.time)}</td><td>${esc(e.event.type.replace("io.zhili.registry.", ""))}</td><td class="mono">${esc((e.event.subject || "").split("/").slice(2).join("/"))}</td>
        <td>${esc((e.event.data && (e.event.data.health || (e.event.data.instance && e.event.data.instance.health))) || "")}</td></tr>`).join("") || "<tr><td colspan=4 class=muted>no changes recorded</td></tr>"}</tbody></table>`;
    } catch (e) { if (!aborted(e)) document.getElementById("history").innerHTML = `<p class="muted">${esc(e.status === 403 ? "this token may not read $registry" : e.message)}</p>`; }
  };
  onMain(async (ev) => {
    const b = ev.target.closest("button[data-maint]");
    if (!b) return;
    b.disabled = true;
    try {
      await api("PUT", `/api/v1/services/${enc(name)}/instances/${enc(b.dataset.id)}/maintenance?namespace=${enc(namespace)}`, { enabled: b.dataset.maint === "on", reason: "console" });
    } catch (e) { showError(e); b.disabled = false; }
  });
  await live(async (index, signal) => {
    const r = await api("GET", `/api/v1/services/${enc(name)}/instances?healthy=false&namespace=${enc(namespace)}&index=${index}&wait=30s`, undefined, signal);
    const rows = r.json.instances.map((i) => {
      const checks = (i.checks || []).map((c) => `<div>${badge(c.status)} ${esc(c.name || c.id)} <span class="muted">since ${esc(when(c.last_change_ms))}</span><div class="mono muted">${esc(c.output)}</div></div>`).join("");
      const passive = i.passive_health ? `<div class="error">ejected: ${esc(i.passive_health.reason)}</div>` : "";
      const maint = i.maintenance
        ? `<div>in maintenance: ${esc(i.maintenance.reason)}</div><button data-maint="off" data-id="${esc(i.id)}" class="secondary" ${offer(writable)}>End maintenance</button>`
        : `<button data-maint="on" data-id="${esc(i.id)}" class="secondary" ${offer(writable)}>Maintenance</button>`;
      return `<tr data-instance="${esc(i.id)}"><td class="mono">${esc(i.id)}</td><td class="mono">${esc(i.address)}:${i.port}</td><td>${esc(i.zone || "")}</td><td>${esc(i.version || "")}</td>
        <td>${i.weight}</td><td class="health">${badge(i.health)}${passive}</td><td>${checks || '<span class="muted">heartbeat</span>'}</td><td>${maint}</td></tr>`;
    });
    document.getElementById("instances").innerHTML = `<table><thead><tr><th>instance</th><th>address</th><th>zone</th><th>version</th><th>weight</th><th>health</th><th>checks</th><th>maintenance</th></tr></thead>
      <tbody>${rows.join("") || "<tr><td colspan=8 class=muted>no instances</td></tr>"}</tbody></table>`;
    const reports = r.json.instances.filter((i) => i.report).map((i) => `<li><b>${esc(i.id)}</b>: ${badge(i.report.state === "ok" ? "passing" : "warning")} ${esc(i.report.state)} ${esc(i.report.message || "")}
      ${(i.report.tasks || []).map((t) => ` · task ${esc(t.name)} ${t.progress ?? ""}%`).join("")}${(i.report.planned || []).map((p) => ` · planned ${esc(p.name)} ${esc(p.at || "")}`).join("")}</li>`);
    document.getElementById("reports").innerHTML = reports.length ? `<ul>${reports.join("")}</ul>` : "none";
    try {
      const d = (await api("GET", `/api/v1/services/${enc(name)}?namespace=${enc(namespace)}`, undefined, signal)).json;
      const b = d.circuit_breaker;
      document.getElementById("breaker").innerHTML = b ? `<p>circuit breaker ${badge(b.state === "closed" ? "passing" : b.state === "open" ? "critical" : "warning")} ${esc(b.state)} · ${esc(b.reason)} · ${esc(when(b.reported_ms))}</p>` : "";
    } catch (e) { if (aborted(e)) throw e; }
    history();
    return r.index;
  });
}

async function topology() {
  showPage("Topology", `<p class="muted">Who calls whom through the gateway over the last minute; nodes coloured by health. Updates every 2 s.</p><div id="graph"></div><div class="table-wrap" id="edges"></div>`);
  await poll(2000, async (signal) => {
    const t = (await api("GET", "/api/v1/topology?window=60s", undefined, signal)).json;
    const services = t.nodes.filter((n) => n.kind === "service"), consumers = t.nodes.filter((n) => n.kind === "consumer");
    const W = 900, H = 520, cx = W / 2 + 60, cy = H / 2, R = Math.min(W, H) / 2 - 70;
    const pos = { gateway: [cx, cy] };
    services.forEach((n, i) => { const a = (2 * Math.PI * i) / Math.max(services.length, 1) - Math.PI / 2; pos[n.id] = [cx + R * Math.cos(a), cy + R * Math.sin(a)]; });
    // Callers known by name (consumers) stand in a column on the left.
    consumers.forEach((n, i) => { pos[n.id] = [70, 60 + ((H - 120) * (i + 0.5)) / consumers.length]; });
    const colour = { passing: "#1f8a3b", warning: "#b77900", critical: "#c62828", empty: "#8a94a3" };
    const edges = t.edges.filter((e) => pos[e.to]).map((e) => {
      const [x1, y1] = pos[e.from] || pos.gateway, [x2, y2] = pos[e.to];
      const label = `${e.requests_per_s.toFixed(1)} r/s · ${(e.error_ratio * 100).toFixed(1)}% err · p99 ${e.p99_ms == null ? "-" : e.p99_ms.toFixed(1) + " ms"}`;
      return `<g class="edge" data-from="${esc(e.from)}" data-to="${esc(e.to)}"><line x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" stroke="${e.error_ratio > 0.05 ? "#c62828" : "#5d6876"}" stroke-width="${1 + Math.min(6, Math.log10(1 + e.requests_per_s) * 2)}"/>
        <text x="${(x1 + x2) / 2}" y="${(y1 + y2) / 2 - 4}" text-anchor="middle">${esc(label)}</text></g>`;
    });
    const nodes = t.nodes.filter((n) => pos[n.id]).map((n) => {
      const [x, y] = pos[n.id];
      return `<g class="node" data-id="${esc(n.id)}"><circle cx="${x}" cy="${y}" r="${n.kind === "gateway" ? 26 : 20}" fill="${n.kind === "gateway" ? "#14202e" : n.kind === "consumer" ? "#0b5cad" : colour[n.health] || "#8a94a3"}"/>
        <text x="${x}" y="${y + 38}" text-anchor="middle">${esc(n.name)}${n.kind === "service" ? ` (${n.passing}/${n.instances})` : ""}</text></g>`;
    });
    document.getElementById("graph").innerHTML = `<svg class="topology" viewBox="0 0 ${W} ${H}" role="img" aria-label="service topology">${edges.join("")}${nodes.join("")}</svg>`;
    document.getElementById("edges").innerHTML = `<table><thead><tr><th>from</th><th>route</th><th>to</th><th>requests/s</th><th>error ratio</th><th>p99</th></tr></thead><tbody>${
      t.edges.map((e) => `<tr><td>${esc(e.from)}</td><td>${esc(e.route)}</td><td>${esc(e.to)}</td><td>${e.requests_per_s.toFixed(2)}</td><td>${(e.error_ratio * 100).toFixed(2)}%</td><td>${e.p99_ms == null ? "-" : e.p99_ms.toFixed(1) + " ms"}</td></tr>`).join("") ||
      "<tr><td colspan=6 class=muted>no traffic through the gateway in the last minute</td></tr>"}</tbody></table>`;
  });
}

async function kv(key) {
  key = key || "";
  const isDir = key === "" || key.endsWith("/");
  showPage("KV", `<div class="split"><div><h2>Keys under /${esc(isDir ? key : key.replace(/[^/]*$/, ""))}</h2><div id="keys" class="table-wrap"></div>
    <form class="inline" id="newkey"><input name="k" placeholder="new key" aria-label="new key" required><button type="submit" class="secondary">Add</button></form></div>
    <div id="editor">${isDir ? '<p class="muted">Choose a key.</p>' : ""}</div></div>`);
  const prefix = isDir ? key : key.replace(/[^/]*$/, "");
  document.getElementById("newkey").onsubmit = (ev) => { ev.preventDefault(); go(`/ui/kv/${prefix}${ev.target.k.value.replace(/^\//, "")}`); };
  const listKeys = async () => {
    const path = prefix ? `/api/v1/kv/${prefix.split("/").map(enc).join("/")}?keys=true&separator=/` : "/api/v1/kv?keys=true&separator=/";
    const keys = (await api("GET", path, undefined, view.abort.signal)).json || [];
    const up = prefix ? `<tr><td><a href="/ui/kv/${esc(prefix.replace(/[^/]*\/$/, ""))}">..</a></td></tr>` : "";
    document.getElementById("keys").innerHTML = `<table><tbody>${up}${keys.map((k) => `<tr><td><a href="/ui/kv/${esc(k)}" class="mono">${esc(k.slice(prefix.length) || k)}</a></td></tr>`).join("") || "<tr><td class=muted>no keys</td></tr>"}</tbody></table>`;
  };
  listKeys().catch((e) => { if (!aborted(e)) showError(e); });
  if (isDir) return;
  const path = `/api/v1/kv/${key.split("/").map(enc).join("/")}`;
  let loaded = null;
  try { loaded = (await api("GET", path, undefined, view.abort.signal)).json; } catch (e) { if (e.status !== 404) throw e; }
  const value = loaded ? new TextDecoder().decode(Uint8Array.from(atob(loaded.value), (c) => c.charCodeAt(0))) : "";
  const index = loaded ? loaded.modify_index : 0;
  document.getElementById("editor").innerHTML = `<h2 class="mono">${esc(key)}</h2><p class="muted" id="kvmeta">${loaded ? `modify index ${index}, version ${loaded.version}` : "new key"}</p>
    <form id="kvform"><label for="kvvalue">Value</label><textarea id="kvvalue">${esc(value)}</textarea>
    <div class="toolbar"><button type="submit">Save</button><button type="button" class="secondary" id="kvdelete" ${loaded ? "" : "disabled"}>Delete</button>
    <span id="kvresult" role="status" aria-live="polite"></span></div></form>`;
  const [writable] = await can([["kv", key, "write"]]);
  if (!writable) document.querySelectorAll("#kvform button").forEach((b) => { b.disabled = true; b.title = "this token may not change this key"; });
  document.getElementById("kvform").onsubmit = async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("kvresult");
    try {
      // Check-and-set on the index this page read: a change made meanwhile is reported, not overwritten.
      const r = await api("PUT", `${path}?cas=${index}`, document.getElementById("kvvalue").value, undefined, true);
      out.innerHTML = `<span class="ok">saved (index ${r.json.index})</span>`;
      setTimeout(() => go(`/ui/kv/${key}`), 600);
    } catch (e) {
      out.innerHTML = e.status === 409
        ? `<span class="error" id="cas-conflict">Conflict: the key changed since you opened it (${esc(e.message)}). Your edit was not saved; reload to see the current value.</span>`
        : `<span class="error">${esc(e.message)}</span>`;
    }
  };
  document.getElementById("kvdelete").onclick = async () => {
    try { await api("DELETE", `${path}?cas=${index}`); go(`/ui/kv/${prefix}`); }
    catch (e) { document.getElementById("kvresult").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
  };
}

// Shows a problem's detail beside the JSON editor, and marks the editor when it names a field.
function fieldError(el, out, e) {
  el.classList.add("field-error");
  const field = (e.message.match(/^([\w.\[\]]+):/) || [])[1];
  out.innerHTML = `<span class="error">${field ? `field <code>${esc(field)}</code>: ` : ""}${esc(e.message)}</span>`;
}

async function routes() {
  showPage("Routes and consumers", `<div class="split"><div><h2>Routes</h2><div id="routes" class="table-wrap"></div><h2>Consumers</h2><div id="consumers" class="table-wrap"></div></div>
    <div><h2 id="edtitle">New route</h2><form id="edform"><label>Kind <select id="edkind"><option value="routes">route</option><option value="consumers">consumer</option></select></label>
    <label>Name <input id="edname" required></label><label for="edspec">Definition (JSON)</label>
    <textarea id="edspec">{"path_prefix": "/demo/", "service": "demo", "strip_prefix": true}</textarea>
    <div class="toolbar"><button type="submit">Save</button><span id="edresult" role="status" aria-live="polite"></span></div></form></div></div>`);
  const [routeWrite, consumerWrite] = await can([["route", "", "write"], ["consumer", "", "write"]]);
  if (!routeWrite && !consumerWrite) document.querySelector("#edform button[type=submit]").disabled = true;
  const edit = (kind, name, spec) => {
    document.getElementById("edkind").value = kind;
    document.getElementById("edname").value = name;
    document.getElementById("edspec").value = JSON.stringify(spec, null, 2);
    document.getElementById("edtitle").textContent = `Edit ${kind === "routes" ? "route" : "consumer"} ${name}`;
  };
  onMain((ev) => { const b = ev.target.closest("button[data-edit]"); if (b) edit(b.dataset.kind, b.dataset.edit, JSON.parse(b.dataset.spec)); });
  document.getElementById("edform").onsubmit = async (ev) => {
    ev.preventDefault();
    const spec = document.getElementById("edspec"), out = document.getElementById("edresult");
    spec.classList.remove("field-error");
    let body;
    try { body = JSON.parse(spec.value); } catch (e) { fieldError(spec, out, new Error(`body: not JSON: ${e.message}`)); return; }
    try {
      await api("PUT", `/api/v1/${document.getElementById("edkind").value}/${enc(document.getElementById("edname").value)}`, body);
      out.innerHTML = `<span class="ok">saved</span>`;
    } catch (e) { fieldError(spec, out, e); }
  };
  await live(async (index, signal) => {
    const r = await api("GET", `/api/v1/routes?index=${index}&wait=30s`, undefined, signal);
    const rs = r.json.routes || [];
    document.getElementById("routes").innerHTML = `<table><thead><tr><th>route</th><th>match</th><th>action</th><th></th></tr></thead><tbody>${rs.map((x) => {
      const s = x.route || x.spec || {};
      const action = s.service ? `→ ${s.service}${s.subset ? " " + JSON.stringify(s.subset) : ""}` : s.split ? `split ${s.split.map((t) => `${t.service}${t.subset ? JSON.stringify(t.subset) : ""}:${t.weight}`).join(", ")}` : s.redirect ? "redirect" : "direct";
      return `<tr><td>${esc(x.name)}</td><td class="mono">${esc((s.hosts || []).join(",") + " " + (s.path || s.path_prefix || s.path_regex || "/"))}</td><td class="mono">${esc(action)}</td>
        <td><button class="secondary" data-kind="routes" data-edit="${esc(x.name)}" data-spec="${esc(JSON.stringify(s))}">Edit</button></td></tr>`;
    }).join("") || "<tr><td colspan=4 class=muted>no routes</td></tr>"}</tbody></table>`;
    try {
      const cs = (await api("GET", "/api/v1/consumers", undefined, signal)).json.consumers || [];
      document.getElementById("consumers").innerHTML = `<table><tbody>${cs.map((x) => `<tr><td>${esc(x.name)}</td><td><button class="secondary" data-kind="consumers" data-edit="${esc(x.name)}" data-spec="${esc(JSON.stringify(x.consumer || x.spec || {}))}">Edit</button></td></tr>`).join("") || "<tr><td class=muted>no consumers</td></tr>"}</tbody></table>`;
    } catch (e) { if (!aborted(e)) document.getElementById("consumers").innerHTML = `<p class="muted">${esc(e.message)}</p>`; }
    return r.index;
  });
}

async function streams(name) {
  if (!name) {
    showPage("Streams", `<h2>Streams</h2><div id="streams" class="table-wrap"></div><h2>Subscriptions</h2><div id="subs" class="table-wrap"></div>`);
    await poll(3000, async (signal) => {
      const list = (await api("GET", "/api/v1/streams?limit=200", undefined, signal)).json;
      const sl = list.streams || list;
      document.getElementById("streams").innerHTML = `<table><thead><tr><th>stream</th><th>last revision</th></tr></thead><tbody>${sl.map((s) => `<tr><td><a href="/ui/streams/${enc(s.stream)}">${esc(s.stream)}</a></td><td>${s.last_revision ?? "-"}</td></tr>`).join("") || "<tr><td colspan=2 class=muted>no streams</td></tr>"}</tbody></table>`;
      try {
        const subs = (await api("GET", "/api/v1/subscriptions", undefined, signal)).json;
        const rows = (subs.subscriptions || subs || []).map((s) => `<tr><td>${esc(s.name)}</td><td>${esc(s.stream || (s.spec && s.spec.stream) || "")}</td><td>${s.lag ?? "-"}</td><td>${s.parked ?? 0}</td></tr>`);
        document.getElementById("subs").innerHTML = `<table><thead><tr><th>name</th><th>stream</th><th>lag</th><th>parked</th></tr></thead><tbody>${rows.join("") || "<tr><td colspan=4 class=muted>none</td></tr>"}</tbody></table>`;
      } catch (e) { if (!aborted(e)) document.getElementById("subs").innerHTML = `<p class="muted">${esc(e.message)}</p>`; }
    });
    return;
  }
  showPage(`Stream ${name}`, `<p class="muted">Live tail (newest last).</p><pre class="tail" id="tail"></pre>`);
  const signal = view.abort.signal;
  const last = (await api("GET", `/api/v1/streams/${enc(name)}?direction=backwards&limit=1`, undefined, signal)).json;
  const from = Math.max(0, ((last.events || [])[0] || { revision: 0 }).revision - 49);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const tail = document.getElementById("tail");
  try {
    const resp = await fetch(`/api/v1/streams/${enc(name)}/subscribe?from=${from}`, { headers, signal });
    if (!resp.ok) throw new ApiError(resp.status, await resp.text());
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const msg = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const data = msg.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        try { const e = JSON.parse(data); tail.textContent += `${e.time || ""} ${e.type} ${e.subject || ""}\n`; } catch (_) { tail.textContent += data + "\n"; }
        tail.scrollTop = tail.scrollHeight;
      }
    }
  } catch (e) { if (!aborted(e)) showError(e); }
}

async function transactions(gid) {
  if (!gid) {
    showPage("Transactions", `<div id="txns" class="table-wrap"></div>`);
    await poll(2000, async (signal) => {
      const r = (await api("GET", "/api/v1/transactions?limit=200", undefined, signal)).json;
      document.getElementById("txns").innerHTML = `<table><thead><tr><th>gid</th><th>mode</th><th>status</th><th>created</th></tr></thead><tbody>${(r.transactions || []).map((t) =>
        `<tr><td><a class="mono" href="/ui/transactions/${enc(t.gid)}">${esc(t.gid)}</a></td><td>${esc(t.trans_type)}</td><td>${esc(t.status)}</td><td>${esc(t.create_time)}</td></tr>`).join("") || "<tr><td colspan=4 class=muted>none</td></tr>"}</tbody></table>`;
    });
    return;
  }
  showPage(`Transaction ${gid}`, `<div id="txn"></div>`);
  await poll(1000, async (signal) => {
    const r = (await api("GET", `/api/v1/transactions/${enc(gid)}`, undefined, signal)).json;
    const t = r.transaction;
    document.getElementById("txn").innerHTML = `<p>${esc(t.trans_type)} · <b>${esc(t.status)}</b> ${t.rollback_reason ? `· ${esc(t.rollback_reason)}` : ""}</p>
      <h2>Branch timeline</h2><ol class="timeline">${(r.branches || []).map((b) => `<li><span class="mono">${esc(b.branch_id)} ${esc(b.op)}</span> ${esc(b.status)} · ${b.attempts} attempt(s) · ${esc(b.update_time || "")}
      <div class="mono muted">${esc(b.url)}${b.error ? ` — ${esc(b.error)}` : ""}</div></li>`).join("")}</ol>`;
  });
}

async function plans(name) {
  if (!name) {
    showPage("Plans", `<div id="plans" class="table-wrap"></div><p class="muted">Apply plans with <code>zhili plan apply NAME FILE</code> or <code>PUT /api/v1/plans/NAME</code>.</p>`);
    await poll(1500, async (signal) => {
      const r = (await api("GET", "/api/v1/plans", undefined, signal)).json;
      document.getElementById("plans").innerHTML = `<table><thead><tr><th>plan</th><th>status</th><th>step</th><th>description</th></tr></thead><tbody>${(r.plans || []).map((p) =>
        `<tr><td><a href="/ui/plans/${enc(p.name)}">${esc(p.name)}</a></td><td>${esc(p.status)}</td><td>${p.step} / ${p.steps}</td><td>${esc(p.description || "")}</td></tr>`).join("") || "<tr><td colspan=4 class=muted>no plans</td></tr>"}</tbody></table>`;
    });
    return;
  }
  showPage(`Plan ${name}`, `<div class="toolbar" id="controls"></div><div id="plan"></div>`);
  onMain(async (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    try { await api("POST", `/api/v1/plans/${enc(name)}/${b.dataset.action}`); } catch (e) { showError(e); }
  });
  const [writable] = await can([["plan", name, "write"]]);
  await poll(1000, async (signal) => {
    const p = (await api("GET", `/api/v1/plans/${enc(name)}`, undefined, signal)).json;
    const running = !["succeeded", "rolled_back", "aborted"].includes(p.status);
    document.getElementById("controls").innerHTML = ["pause", "resume", "approve", "abort"].map((a) => {
      const enabled = writable && running && (a !== "pause" || p.status === "running") && (a !== "resume" || p.status === "paused") && (a !== "approve" || p.waiting_for_approval);
      return `<button data-action="${a}" ${enabled ? "" : "disabled"} class="${a === "abort" ? "secondary" : ""}">${a}</button>`;
    }).join("");
    const steps = p.steps.map((s, i) => `<li ${i === p.step ? 'aria-current="step"' : ""}>${i < p.step ? "✓" : i === p.step && running ? "▶" : "·"} <b>${esc(s.kind)}</b> <span class="mono">${esc(JSON.stringify(s))}</span></li>`);
    document.getElementById("plan").innerHTML = `<p>status <b id="plan-status">${esc(p.status)}</b> · step ${Math.min(p.step + 1, p.steps.length)} of ${p.steps.length}${p.waiting_for_approval ? " · <b>waiting for approval</b>" : ""}</p>
      <h2>Steps</h2><ol class="timeline">${steps.join("")}</ol><h2>Decisions</h2><div class="table-wrap"><table><thead><tr><th>at</th><th>decision</th><th>reason</th></tr></thead><tbody>${
      p.history.slice().reverse().map((d) => `<tr><td>${esc(d.at)}</td><td>${esc(d.decision)}</td><td>${esc(d.reason)}</td></tr>`).join("")}</tbody></table></div>`;
  });
}

async function acl() {
  showPage("ACL", `<h2>Tokens</h2><div id="tokens" class="table-wrap"></div><h2>Policies</h2><div id="policies" class="table-wrap"></div>`);
  await poll(5000, async (signal) => {
    const tokens = (await api("GET", "/api/v1/acl/tokens", undefined, signal)).json;
    document.getElementById("tokens").innerHTML = `<table><thead><tr><th>accessor</th><th>description</th><th>policies</th></tr></thead><tbody>${(tokens || []).map((t) =>
      `<tr><td class="mono">${esc(t.accessor_id)}</td><td>${esc(t.description || "")}</td><td>${esc((t.policies || []).join(", "))}</td></tr>`).join("")}</tbody></table>`;
    const policies = (await api("GET", "/api/v1/acl/policies", undefined, signal)).json;
    document.getElementById("policies").innerHTML = `<table><thead><tr><th>policy</th><th>rules</th></tr></thead><tbody>${(policies || []).map((p) =>
      `<tr><td>${esc(p.name)}</td><td class="mono">${esc((p.rules || []).map((r) => `${r.resource}:${r.prefix}:${r.access}`).join("  "))}</td></tr>`).join("")}</tbody></table>`;
  });
}

whoami();
route();
