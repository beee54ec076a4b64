// ccm dashboard. Signs in with the API key (kept in sessionStorage, sent only as the X-API-Key
// header), follows /api/events with fetch() streaming because EventSource cannot send headers,
// and renders with textContent only: ids, tags and errors come from clients, never parse them.
// Every id that goes into a URL goes through encodeURIComponent (ids may hold "/", "?", "#").
"use strict";

const KEY_STORAGE = "ccm.apiKey";
const STATES = ["pending", "running", "completed", "failed", "cancelled", "interrupted"];
const SILENCE_MS = 40000; // the server sends a keepalive every 15 s; this long without one = dead
const REASON_COLORS = {
  closed: "#6b8fc7", connection_lost: "#e08a2e", heartbeat_timeout: "#c23b3b", replaced: "#8a5cc7",
  slow_consumer: "#a0662a", frame_too_large: "#d4548a", protocol_error: "#7d3030",
  server_shutdown: "#8c96a5", server_restart: "#5b6472",
};
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const app = {
  key: null, snapshot: null, abort: null, selected: null, detailKey: null, skewMs: 0,
  session: null, sessionKey: null, // the session run shown in the session panel (its ccm id)
};

class AuthError extends Error {}

// -- small DOM helpers ----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fillTable(id, rows, emptyId) {
  // Each cell carries its column's name: on a phone the rows are stacked as label/value cards.
  const labels = [...$(id).querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of rows) [...row.children].forEach((td, i) => td.setAttribute("data-label", labels[i] || ""));
  $(id).querySelector("tbody").replaceChildren(...rows);
  if (emptyId) $(emptyId).hidden = rows.length > 0;
}

// -- time -----------------------------------------------------------------------------------------

const serverNow = () => Date.now() + app.skewMs;

function clockTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  const text = d.toISOString();
  const today = new Date(serverNow()).toISOString().slice(0, 10);
  return text.slice(0, 10) === today ? text.slice(11, 19) : `${text.slice(0, 10)} ${text.slice(11, 16)}`;
}

function span(seconds) {
  if (seconds < 1) return `${Math.max(0, Math.round(seconds * 1000))} ms`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.round(seconds % 60)} s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} m`;
  return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
}

function ago(iso) {
  if (!iso) return "—";
  const seconds = (serverNow() - new Date(iso).getTime()) / 1000;
  return seconds < 3 ? "just now" : `${span(seconds)} ago`;
}

const when = (iso) => (iso ? `${clockTime(iso)} · ${ago(iso)}` : "—");

function duration(session) {
  if (session.duration_seconds !== null && session.duration_seconds !== undefined) {
    return span(session.duration_seconds);
  }
  const start = session.started_at || session.created_at;
  return `${span((serverNow() - new Date(start).getTime()) / 1000)} so far`;
}

// -- API ------------------------------------------------------------------------------------------

async function api(path, init) {
  const response = await fetch(path, {
    ...init,
    cache: "no-store",
    headers: { "X-API-Key": app.key, Accept: "application/json" },
  });
  if (response.status === 401) throw new AuthError("The API key was refused.");
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response;
}

async function readEvents(controller) {
  const response = await api("/api/events", { signal: controller.signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        onEvent(block);
      }
    }
  } finally {
    clearTimeout(watchdog);
  }
}

function onEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (kind === "snapshot" && data.length) show(JSON.parse(data.join("\n")));
}

async function follow() {
  let delay = 1000;
  while (app.key) {
    const controller = new AbortController();
    app.abort = controller;
    setStatus("wait", "connecting…");
    try {
      await readEvents(controller);
      delay = 1000; // a clean end (the server ends streams after 15 min): reconnect at once
    } catch (error) {
      if (error instanceof AuthError) return signOut(error.message);
      if (!app.key) return;
      setStatus("off", "offline, retrying");
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

// -- sign in / out --------------------------------------------------------------------------------

async function signIn(key) {
  app.key = key;
  try {
    const response = await api("/api/dashboard/snapshot");
    show(await response.json());
  } catch (error) {
    return signOut(error instanceof AuthError ? error.message : `Cannot reach ccm: ${error.message}`);
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  follow();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  app.key = null;
  app.session = null;
  app.selected = null;
  $("session-detail").hidden = true;
  $("detail").hidden = true;
  if (app.abort) app.abort.abort();
  app.snapshot = null;
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("off", "signed out");
}

function setStatus(kind, text) {
  const pill = $("status");
  pill.className = `pill pill-${kind}`;
  pill.textContent = text;
}

// -- rendering ------------------------------------------------------------------------------------

function show(snapshot) {
  app.snapshot = snapshot;
  app.skewMs = new Date(snapshot.server_time).getTime() - Date.now();
  if (app.abort && !app.abort.signal.aborted) setStatus("live", "live");
  render();
}

function render() {
  const s = app.snapshot;
  if (!s) return;
  $("clock").textContent = `server time ${clockTime(s.server_time)} UTC`;
  $("n-devices").textContent = s.devices.length;
  $("n-constellations").textContent = s.constellations.length;
  $("n-sessions").textContent = s.live_sessions;
  $("n-store").textContent = !s.store.enabled ? "none" : s.store.degraded ? "degraded" : "ok";
  $("n-store").classList.toggle("bad", s.store.degraded);
  updateFilters(s);
  const devices = filteredDevices(s);
  const filtering = $("filter-platform").value || $("filter-tag").value;
  if (app.selected && filtering && !devices.some((d) => d.client_id === app.selected)) closeDetail();
  renderDevices(devices);
  renderConstellations(s.constellations);
  renderNodes(s.nodes || []);
  renderSessions(s, devices);
  renderCharts(s.series);
  refreshDetail(s);
  refreshSession(s);
}

function chips(values) {
  return values.length ? el("span", null, ...values.map((v) => el("span", { class: "chip" }, v))) : "—";
}

function stateCell(state) {
  return el("td", { class: `state state-${state}` }, state);
}

// "2/5 running, 3 queued": running of capacity (no "/n" when unlimited); "—" for another node's.
function loadText(d) {
  if (d.running === null || d.running === undefined) return d.sessions.length ? `${d.sessions.length}` : "—";
  const capacity = d.capacity === null ? "" : `/${d.capacity}`;
  return `${d.running}${capacity} running` + (d.queued ? `, ${d.queued} queued` : "");
}

function renderDevices(devices) {
  fillTable("devices", devices.map((d) => {
    const open = el("button", { type: "button", class: "link", "data-device": d.client_id }, d.client_id);
    open.addEventListener("click", () => select(d.client_id));
    const running = loadText(d) + (d.sessions.length ? `: ${d.sessions.join(", ")}` : "");
    return el("tr", { class: d.client_id === app.selected ? "selected" : null, "data-device": d.client_id },
      el("td", null, open, d.mode === "relay" ? el("span", { class: "muted" }, " relay") : null),
      el("td", null, d.node || "—"), el("td", null, d.platform), el("td", null, when(d.connected_at)),
      el("td", null, ago(d.last_heartbeat_at)), el("td", null, chips(d.tags)),
      el("td", null, chips(d.capabilities)), el("td", { class: "mono" }, running));
  }), "devices-empty");
}

function renderConstellations(constellations) {
  fillTable("constellations", constellations.map((c) => el("tr", null,
    el("td", { class: "mono" }, c.client_id), el("td", null, c.node || "—"),
    el("td", null, c.target_id || (c.remote ? "—" : "any")),
    el("td", null, when(c.connected_at)), el("td", null, ago(c.last_heartbeat_at)),
    el("td", { class: "mono" }, c.sessions.length ? c.sessions.join(", ") : "0"))), "constellations-empty");
}

function renderNodes(nodes) {
  fillTable("nodes", nodes.map((n) => el("tr", { class: n.this_node ? "selected" : null },
    el("td", null, n.name, n.this_node ? el("span", { class: "muted" }, " (this page's node)") : null),
    el("td", { class: "mono" }, n.address || "—"), el("td", null, String(n.clients)))));
}

function reasonText(session) {
  return [session.reason, session.error].filter(Boolean).join(": ") || "";
}

function sessionLink(x) {
  const open = el("button", { type: "button", class: "link mono", "data-open-session": x.id }, x.session_id);
  open.addEventListener("click", () => openSession(x.id));
  return open;
}

function renderSessions(s, devices) {
  $("sessions-error").textContent = s.sessions_error || "";
  const deviceFilter = $("filter-platform").value || $("filter-tag").value;
  const allowed = new Set(devices.map((d) => d.client_id));
  const state = $("filter-state").value;
  const rows = (s.sessions || []).filter((x) => (!state || x.state === state)
    && (!deviceFilter || allowed.has(x.device_id)));
  fillTable("sessions", rows.map((x) => el("tr", { "data-session": x.session_id, class: x.id === app.session ? "selected" : null },
    el("td", { class: "mono" }, sessionLink(x)), stateCell(x.state), el("td", { class: "mono" }, x.device_id),
    el("td", { class: "mono" }, x.constellation_id || x.origin), el("td", null, x.task_name || "—"),
    el("td", null, clockTime(x.created_at)), el("td", null, duration(x)),
    el("td", null, reasonText(x)))), "sessions-empty");
}

// -- filters --------------------------------------------------------------------------------------

function setOptions(select, values) {
  const current = select.value;
  const wanted = ["", ...values];
  const have = [...select.options].map((o) => o.value);
  if (have.join("\u0000") !== wanted.join("\u0000")) {
    select.replaceChildren(...wanted.map((v) => el("option", { value: v }, v || "all")));
  }
  select.value = wanted.includes(current) ? current : "";
}

function updateFilters(s) {
  const platforms = new Set(s.devices.map((d) => d.platform));
  const tags = new Set(s.devices.flatMap((d) => d.tags));
  // Keep a chosen value selectable even when no device has it right now.
  if ($("filter-platform").value) platforms.add($("filter-platform").value);
  if ($("filter-tag").value) tags.add($("filter-tag").value);
  setOptions($("filter-platform"), [...platforms].sort());
  setOptions($("filter-tag"), [...tags].sort());
  setOptions($("filter-state"), STATES);
}

function filteredDevices(s) {
  const platform = $("filter-platform").value;
  const tag = $("filter-tag").value;
  return s.devices.filter((d) => (!platform || d.platform === platform) && (!tag || d.tags.includes(tag)));
}

// -- charts ---------------------------------------------------------------------------------------

const BOX = { width: 400, height: 150, left: 30, right: 6, top: 12, bottom: 22 }; // ~1:1 on screen

function frame(node, max) {
  const plotH = BOX.height - BOX.top - BOX.bottom;
  const bottom = BOX.top + plotH;
  node.replaceChildren(
    svg("line", { class: "axis", x1: BOX.left, y1: bottom, x2: BOX.width - BOX.right, y2: bottom }),
    svg("line", { class: "axis", x1: BOX.left, y1: BOX.top, x2: BOX.width - BOX.right, y2: BOX.top }),
    svg("text", { x: BOX.left - 6, y: BOX.top + 4, "text-anchor": "end" }, String(max)),
    svg("text", { x: BOX.left - 6, y: bottom + 4, "text-anchor": "end" }, "0"),
    svg("text", { x: BOX.left, y: BOX.height - 4 }, "−60 min"),
    svg("text", { x: (BOX.left + BOX.width) / 2, y: BOX.height - 4, "text-anchor": "middle" }, "−30 min"),
    svg("text", { x: BOX.width - BOX.right, y: BOX.height - 4, "text-anchor": "end" }, "now"),
  );
  const step = (BOX.width - BOX.left - BOX.right) / 60;
  return { plotH, bottom, step, y: (v) => bottom - (v / max) * plotH };
}

function niceMax(values) {
  const top = Math.max(1, ...values.filter((v) => v !== null));
  return top <= 5 ? top : Math.ceil(top / 5) * 5;
}

function stackedBars(node, minutes, layers) {
  const totals = minutes.map((_, i) => layers.reduce((sum, layer) => sum + layer.values[i], 0));
  const f = frame(node, niceMax(totals));
  minutes.forEach((minute, i) => {
    let base = 0;
    for (const layer of layers) {
      const v = layer.values[i];
      if (!v) continue;
      const rect = svg("rect", {
        class: "bar", x: BOX.left + i * f.step + 1, width: Math.max(1, f.step - 2),
        y: f.y(base + v), height: f.y(base) - f.y(base + v),
      });
      if (layer.color) rect.style.fill = layer.color; // CSSOM: the CSP forbids style attributes
      rect.append(svg("title", {}, `${clockTime(minute)} UTC: ${v} ${layer.label}`));
      node.append(rect);
      base += v;
    }
  });
}

function line(node, minutes, values) {
  const f = frame(node, niceMax(values));
  let path = "";
  let area = "";
  let runStart = null;
  values.forEach((v, i) => {
    const x = BOX.left + (i + 0.5) * f.step;
    if (v === null) { if (runStart !== null) area += `L${x - f.step},${f.bottom}Z`; runStart = null; return; }
    path += `${runStart === null ? "M" : "L"}${x},${f.y(v)}`;
    area += runStart === null ? `M${x},${f.bottom}L${x},${f.y(v)}` : `L${x},${f.y(v)}`;
    if (runStart === null) runStart = x;
  });
  if (runStart !== null) area += `L${BOX.left + (values.length - 0.5) * f.step},${f.bottom}Z`;
  node.append(svg("path", { class: "area", d: area }), svg("path", { class: "line", d: path }));
  values.forEach((v, i) => { // dots, so a minute on its own (a fresh server) is visible too
    if (v === null) return;
    const dot = svg("circle", { class: "dot", cx: BOX.left + (i + 0.5) * f.step, cy: f.y(v), r: 2.5 });
    dot.append(svg("title", {}, `${clockTime(minutes[i])} UTC: ${v} devices`));
    node.append(dot);
  });
  const last = values.filter((v) => v !== null).at(-1);
  if (last !== undefined) node.append(svg("text", { x: BOX.left + 6, y: BOX.top + 14 }, `now: ${last}`));
}

function renderCharts(series) {
  stackedBars($("chart-sessions"), series.minutes, [{ label: "started", values: series.sessions_started }]);
  line($("chart-devices"), series.minutes, series.devices);
  const reasons = Object.keys(series.disconnects);
  const palette = ["#6b8fc7", "#e08a2e", "#8a5cc7", "#2a9d8f", "#d4548a"];
  const layers = reasons.map((reason, i) => ({
    label: reason, values: series.disconnects[reason], color: REASON_COLORS[reason] || palette[i % palette.length],
  }));
  stackedBars($("chart-disconnects"), series.minutes, layers);
  $("legend-disconnects").replaceChildren(...(layers.length ? layers.map((l) => {
    const item = el("li", null, `${l.label} (${l.values.reduce((a, b) => a + b, 0)})`);
    item.style.setProperty("--swatch", l.color);
    return item;
  }) : [el("li", { class: "muted" }, "no disconnects in the last hour")]));
}

// -- device detail (connection history and sessions from SQL) -------------------------------------

function closeDetail() {
  app.selected = null;
  app.detailKey = null;
  $("detail").hidden = true;
}

function select(deviceId) {
  app.selected = deviceId;
  app.detailKey = null;
  $("detail").hidden = false;
  $("detail-id").textContent = deviceId;
  render();
  $("detail").scrollIntoView({ block: "nearest" });
}

function refreshDetail(s) {
  if (!app.selected) return;
  const device = s.devices.find((d) => d.client_id === app.selected);
  const key = JSON.stringify([device && device.connected_at,
    (s.sessions || []).filter((x) => x.device_id === app.selected).map((x) => [x.id, x.state])]);
  if (key === app.detailKey) return;
  app.detailKey = key;
  loadDetail(app.selected);
}

async function loadDetail(deviceId) {
  const id = encodeURIComponent(deviceId);
  if (app.snapshot && !app.snapshot.store.enabled) {
    fillTable("detail-connections", []);
    fillTable("detail-sessions", []);
    $("detail-error").textContent = "ccm runs without a database: there is no history to show.";
    return;
  }
  try {
    const [connections, sessions] = await Promise.all([
      api(`/api/clients/${id}/connections?limit=20`).then((r) => r.json()),
      api(`/api/sessions?device_id=${id}&limit=20`).then((r) => r.json()),
    ]);
    if (app.selected !== deviceId) return;
    $("detail-error").textContent = "";
    fillTable("detail-connections", connections.items.map((c) => {
      const open = !c.disconnected_at;
      const lasted = ((open ? serverNow() : new Date(c.disconnected_at).getTime()) - new Date(c.connected_at).getTime()) / 1000;
      return el("tr", { class: open ? "open" : null },
        el("td", null, clockTime(c.connected_at)),
        el("td", null, open ? "now (open)" : clockTime(c.disconnected_at)),
        el("td", null, open ? `${span(lasted)} so far` : span(lasted)),
        el("td", null, open ? "—" : c.disconnect_reason || "—"),
        el("td", { class: "mono" }, c.remote_address || "—"));
    }));
    fillTable("detail-sessions", sessions.items.map((x) => el("tr", { "data-session": x.session_id },
      el("td", { class: "mono" }, sessionLink(x)), stateCell(x.state), el("td", null, clockTime(x.created_at)),
      el("td", null, x.ended_at ? span((new Date(x.ended_at) - new Date(x.started_at || x.created_at)) / 1000) : "running"),
      el("td", { class: "mono" }, x.constellation_id || x.origin), el("td", null, x.reason || "—"),
      el("td", { class: x.error ? "error-text" : null }, x.error || "—"))));
  } catch (error) {
    if (error instanceof AuthError) return signOut(error.message);
    $("detail-error").textContent = `Could not load the history: ${error.message}`;
  }
}

// -- one session's story (request, result, error, timeline) from SQL -------------------------------

function openSession(runId) {
  app.session = runId;
  app.sessionKey = null;
  $("session-detail").hidden = false;
  $("session-id").textContent = "…";
  render();
  loadSession(runId).then(() => $("session-detail").scrollIntoView({ block: "nearest" }));
}

function closeSession() {
  app.session = null;
  app.sessionKey = null;
  $("session-detail").hidden = true;
  render();
}

function refreshSession(s) {
  if (!app.session) return;
  const row = (s.sessions || []).find((x) => x.id === app.session);
  const key = row ? `${row.state}|${row.ended_at}` : app.sessionKey;
  if (key === app.sessionKey) return;
  app.sessionKey = key;
  loadSession(app.session);
}

function pretty(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "string") {
    try { return JSON.stringify(JSON.parse(value), null, 2); } catch { return value; }
  }
  return JSON.stringify(value, null, 2);
}

function fact(name, ...value) {
  return [el("dt", null, name), el("dd", null, ...value)];
}

function connectionText(c) {
  if (!c) return "none open at the time";
  const ended = c.disconnected_at ? `until ${clockTime(c.disconnected_at)} (${c.disconnect_reason || "?"})` : "still open";
  return `connected ${clockTime(c.connected_at)} from ${c.remote_address || "?"}, ${ended}`;
}

function timeline(story) {
  const x = story.session;
  const start = new Date(x.started_at || x.created_at).getTime();
  const steps = [];
  const device = story.device_connection;
  if (device) steps.push([device.connected_at, `device ${x.device_id} connected from ${device.remote_address || "?"}`]);
  steps.push([x.created_at, `created by ${x.constellation_id || x.origin} (${x.mode} mode)`]);
  if (x.started_at) steps.push([x.started_at, `started on ${x.device_id}`]);
  if (x.ended_at) {
    const took = span((new Date(x.ended_at).getTime() - start) / 1000);
    steps.push([x.ended_at, `${x.state} after ${took}${x.reason ? ` (${x.reason})` : ""}`]);
  } else {
    steps.push([null, `${x.state}, ${span((serverNow() - start) / 1000)} so far`]);
  }
  if (device && device.disconnected_at) {
    steps.push([device.disconnected_at, `device disconnected (${device.disconnect_reason || "?"})`]);
  }
  steps.sort((a, b) => (a[0] === null) - (b[0] === null) || new Date(a[0]) - new Date(b[0]));
  return steps.map(([at, text]) => el("li", null, el("span", { class: "when" }, at ? clockTime(at) : "now"), el("span", null, text)));
}

async function loadSession(runId) {
  try {
    const story = await api(`/api/dashboard/sessions/${encodeURIComponent(runId)}`).then((r) => r.json());
    if (app.session !== runId) return;
    const x = story.session;
    $("session-load-error").textContent = "";
    $("session-id").textContent = x.session_id;
    $("session-state").textContent = x.state;
    $("session-state").className = `state state-${x.state}`;
    const others = story.other_runs.length ? ` (${story.other_runs.length} other run${story.other_runs.length > 1 ? "s" : ""} of this id)` : "";
    $("session-facts").replaceChildren(
      ...fact("State", x.state), ...fact("Reason", x.reason || "—"),
      ...fact("Device", x.device_id, el("span", { class: "muted" }, ` · ${x.mode} mode`)),
      ...fact("Requested by", x.constellation_id || x.origin), ...fact("Task", x.task_name || "—"),
      ...fact("Duration", duration({ ...x, duration_seconds: story.duration_seconds })),
      ...fact("Device connection", connectionText(story.device_connection)),
      ...(x.constellation_id ? fact("Requester connection", connectionText(story.requester_connection)) : []),
      ...fact("Run", el("span", { class: "mono" }, x.id), others),
    );
    $("session-timeline").replaceChildren(...timeline(story));
    $("session-request").textContent = pretty(x.request);
    $("session-result").textContent = pretty(x.result);
    $("session-error-box").hidden = !x.error;
    $("session-error").textContent = x.error || "";
  } catch (error) {
    if (error instanceof AuthError) return signOut(error.message);
    $("session-load-error").textContent = `Could not load the session: ${error.message}`;
  }
}

// -- start ----------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("api-key");
    const key = input.value.trim();
    input.value = ""; // do not leave the key in the DOM
    $("login-error").textContent = "";
    if (key) signIn(key);
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("detail-close").addEventListener("click", () => {
    closeDetail();
    render();
  });
  $("session-close").addEventListener("click", closeSession);
  for (const id of ["filter-platform", "filter-tag", "filter-state"]) $(id).addEventListener("change", render);
  $("filter-clear").addEventListener("click", () => {
    for (const id of ["filter-platform", "filter-tag", "filter-state"]) $(id).value = "";
    render();
  });
  setInterval(render, 5000); // keep "ago" and running durations current between snapshots
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved);
});
