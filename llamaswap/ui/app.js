// llamaswap web UI. Plain browser JavaScript, no build step, no external files.
// Live state comes from /api/events; logs from /logs/stream/<source>;
// actions use POST /api/models/load/<id> and /api/models/unload[/<id>];
// the memory bar (only with memory.budget set) polls GET /running.
// Credentials: same-origin requests carry the browser's Basic-auth credentials (when apiKeys is set);
// nothing is stored by the UI. GET /api/me tells what the key may do: for a key that is no admin's,
// the admin actions (load, unload, logs, upstream links) are hidden.
"use strict";

const LOG_LIMIT = 256 * 1024;        // characters kept in the log view
const MAX_REQUESTS = 100;            // rows in the recent-requests table
const DROP_MARKER = /\n\u2014 \d+ bytes dropped \u2014\n/g;  // the marker written when a slow reader lost log bytes

const $ = (sel) => document.querySelector(sel);
const modelsBody = $("#models tbody");
const requestsBody = $("#requests tbody");
const logView = $("#log");
const logSource = $("#log-source");
const pending = new Map();           // model id -> "load" | "unload" while a request runs
let models = [];
let me = { admin: true, name: null };  // the scope of our API key, from GET /api/me

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function modelPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

function notice(text, isError) {
  const n = $("#notice");
  n.textContent = text || "";
  n.classList.toggle("error", !!isError);
}

async function post(url) {
  const resp = await fetch(url, { method: "POST", headers: { "Accept": "application/json" } });
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : `${resp.status} ${resp.statusText}`;
    throw new Error(msg);
  }
  return body;
}

async function modelAction(id, action) {
  pending.set(id, action);
  renderModels();
  notice(`${action === "load" ? "loading" : "unloading"} ${id}…`);
  try {
    await post(`/api/models/${action}/${modelPath(id)}`);
    notice(`${id}: ${action === "load" ? "ready" : "unloaded"}`);
  } catch (e) {
    notice(`${id}: ${e.message}`, true);
  } finally {
    pending.delete(id);
    renderModels();
  }
}

// -- models --------------------------------------------------------------------------------------

function renderModels() {
  const rows = models.map((m) => {
    const busy = pending.get(m.id);
    const running = m.state === "starting" || m.state === "ready";
    const idCell = el("td", { class: "model" },
      el("span", { class: "id" }, m.id),
      m.unlisted ? el("span", { class: "tag", title: "not listed in /v1/models" }, "unlisted") : null,
      m.name ? el("div", { class: "name" }, m.name) : null);
    const actions = !me.admin ? el("td", { class: "actions", hidden: true }) : el("td", { class: "actions" },
      el("button", { type: "button", class: "load", disabled: !!busy || m.state === "ready",
                     onclick: () => modelAction(m.id, "load") }, busy === "load" ? "Loading…" : "Load"),
      el("button", { type: "button", class: "unload", disabled: !!busy || !running && m.state !== "stopping",
                     onclick: () => modelAction(m.id, "unload") }, busy === "unload" ? "Unloading…" : "Unload"),
      // The model's own server is reached under /upstream/<id>/. Link to llama-server's /props
      // (the loaded model's settings): its web UI at /upstream/<id>/ exists only in llama-server
      // builds that embed it (one built offline has none), so a link there could lead to a 404.
      m.state === "ready" ? el("a", { class: "open", href: `/upstream/${modelPath(m.id)}/props`, target: "_blank",
                                      title: `the model's own server (/upstream/${m.id}/): llama-server's /props` },
                               "props ↗") : null);
    return el("tr", { "data-model": m.id, "data-state": m.state },
      idCell,
      el("td", { class: "desc" }, m.description || ""),
      el("td", { class: "aliases" }, (m.aliases || []).join(", ")),
      el("td", {}, el("span", { class: `state state-${m.state}` }, m.state)),
      el("td", { class: "num inflight" }, m.inflight),
      el("td", { class: "num waiting" }, m.waiting),
      actions);
  });
  if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 7 }, "no models configured")));
  modelsBody.replaceChildren(...rows);
}

function updateSourceOptions() {
  const wanted = ["", "proxy", "upstream", ...models.map((m) => m.id)];
  const have = Array.from(logSource.options).map((o) => o.value);
  if (wanted.join("\n") === have.join("\n")) return;
  const current = logSource.value;
  logSource.replaceChildren(...wanted.map((v) => el("option", { value: v }, v === "" ? "combined" : v)));
  logSource.value = wanted.includes(current) ? current : "";
  if (logSource.value !== current && me.admin) openLog();
}

// -- recent requests -----------------------------------------------------------------------------

function fmtMs(ms) {
  if (ms < 0) return "–";
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function fmtNum(n, digits) {
  if (n === null || n === undefined || n < 0) return "–";
  return digits ? Number(n).toFixed(digits) : String(n);
}

function addRequests(records) {
  const empty = requestsBody.querySelector("tr.empty");
  if (empty && records.length) empty.remove();
  for (const r of records) {
    const time = new Date(r.timestamp).toLocaleTimeString();
    const cls = r.status >= 500 || r.status === 499 ? "bad" : r.status >= 400 ? "warn" : "ok";
    const row = el("tr", { "data-id": r.id },
      el("td", { title: r.timestamp }, time),
      el("td", {}, r.model || "–"),
      el("td", { class: "endpoint" }, r.endpoint),
      el("td", {}, el("span", { class: `status ${cls}` }, r.status)),
      el("td", { class: "num" }, fmtMs(r.duration_ms)),
      el("td", { class: "num" }, fmtMs(r.ttfb_ms)),
      el("td", { class: "num" }, fmtNum(r.input_tokens)),
      el("td", { class: "num" }, fmtNum(r.output_tokens)),
      el("td", { class: "num" }, fmtNum(r.cached_tokens)),
      el("td", { class: "num" }, fmtNum(r.prompt_per_second, 1)),
      el("td", { class: "num" }, fmtNum(r.tokens_per_second, 1)));
    requestsBody.prepend(row);
  }
  while (requestsBody.rows.length > MAX_REQUESTS) requestsBody.lastElementChild.remove();
}

// -- memory budget -------------------------------------------------------------------------------
// GET /running has memory_budget, memory_used and memory_free, and per model its need (memory,
// memory_source, load_time) when memory.budget is set. Without a budget (or when /running fails)
// the section stays hidden. /running is read soon after a model changes state (and again a little
// later, when a fresh start's need has been measured), and otherwise every few seconds while the
// page is visible: slowly, since every read is a line in the access log.

const MEMORY_POLL_MS = 10000;        // while a budget is shown
const MEMORY_IDLE_POLL_MS = 60000;   // while none is (a config reload may add one)
const MEMORY_SETTLE_MS = 3000;       // the follow-up read after a state change
const MEMORY_COLORS = 6;             // .mem-color-0 .. -5 in style.css
let memoryTimer = null;
let memoryDue = 0;
let memoryShown = false;
let memoryInFlight = false;
let memoryAgain = false;
let memoryFollowUpAt = 0;           // when to read again after a state change
let lastStates = "";

function fmtBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "?";
  if (Math.abs(n) >= 2 ** 30) return `${(n / 2 ** 30).toFixed(1)} GiB`;
  return `${(n / 2 ** 20).toFixed(1)} MiB`;
}

function isSize(n) {
  return typeof n === "number" && Number.isFinite(n) && n >= 0;
}

function renderMemory(body) {
  const section = $("#memory-section");
  const budget = body && isSize(body.memory_budget) && body.memory_budget > 0 ? body.memory_budget : null;
  memoryShown = budget !== null;
  if (budget === null) {
    section.hidden = true;
    return;
  }
  const running = Array.isArray(body.running) ? body.running : [];
  const shares = running.filter((m) => m && isSize(m.memory) && m.memory > 0);
  const used = isSize(body.memory_used) ? body.memory_used : shares.reduce((sum, m) => sum + m.memory, 0);
  const free = isSize(body.memory_free) ? body.memory_free : Math.max(0, budget - used);
  const scale = Math.max(budget, used, 1);   // above the budget (a start in progress): show all of it
  const width = (n) => `${(100 * n / scale).toFixed(3)}%`;

  const segments = [];
  const legend = [];
  shares.forEach((m, i) => {
    const source = m.memory_source || "unknown";
    const loads = isSize(m.load_time) && m.load_time > 0 ? `, loads in ${m.load_time.toFixed(1)} s` : "";
    const title = `${m.model}: ${fmtBytes(m.memory)} (${source}), ${m.state}${loads}`;
    const color = `mem-color-${i % MEMORY_COLORS}`;
    const seg = el("div", { class: `mem-share ${color} mem-${m.state}`, "data-model": m.model, title },
      el("span", { class: "label" }, m.model));
    seg.style.width = width(m.memory);
    segments.push(seg);
    legend.push(el("li", { "data-model": m.model, title },
      el("span", { class: `swatch ${color}` }),
      el("span", { class: "id" }, m.model), " ",
      el("span", { class: "size" }, fmtBytes(m.memory)), " ",
      el("span", { class: `source source-${source}` }, source)));
  });
  if (free > 0) {
    const seg = el("div", { class: "mem-free", title: `free: ${fmtBytes(free)}` });
    seg.style.width = width(free);
    segments.push(seg);
  }
  legend.push(el("li", { class: "free" }, el("span", { class: "swatch mem-free" }),
    el("span", { class: "id" }, "free"), " ", el("span", { class: "size" }, fmtBytes(free))));

  $("#memory-bar").replaceChildren(...segments);
  $("#memory-bar").setAttribute("aria-label",
    `memory: ${fmtBytes(used)} of ${fmtBytes(budget)} used, ${fmtBytes(free)} free`);
  $("#memory-legend").replaceChildren(...legend);
  $("#memory-summary").textContent = `${fmtBytes(used)} of ${fmtBytes(budget)} budget in use`;
  section.hidden = false;
}

async function refreshMemory() {
  if (memoryInFlight) { memoryAgain = true; return; }
  memoryInFlight = true;
  try {
    const resp = await fetch("/running", { headers: { "Accept": "application/json" }, cache: "no-store" });
    if (resp.ok) renderMemory(await resp.json());
  } catch (e) {
    /* the daemon is restarting or unreachable: keep the last picture until the next read */
  } finally {
    memoryInFlight = false;
    if (memoryAgain) { memoryAgain = false; refreshMemory(); }
  }
}

function scheduleMemory(delay) {
  // The next read in `delay` ms, unless one is already due sooner (a burst of events must not
  // keep pushing it back). Nothing while the page is hidden: it resumes when shown again.
  const due = Date.now() + delay;
  if (memoryTimer !== null && memoryDue <= due) return;
  clearTimeout(memoryTimer);
  memoryTimer = null;
  if (document.hidden) return;
  memoryDue = due;
  memoryTimer = setTimeout(async () => {
    memoryTimer = null;
    await refreshMemory();
    const followUp = memoryFollowUpAt - Date.now();
    const poll = memoryShown ? MEMORY_POLL_MS : MEMORY_IDLE_POLL_MS;
    scheduleMemory(followUp > 0 ? Math.min(poll, followUp) : poll);
  }, delay);
}

function memoryStatesChanged(list) {
  // Queue and in-flight counts change with every request; only a change of state (or of the
  // models configured) changes the memory picture.
  const states = list.map((m) => `${m.id}=${m.state}`).join(",");
  if (states === lastStates) return;
  lastStates = states;
  memoryFollowUpAt = Date.now() + 250 + MEMORY_SETTLE_MS;
  scheduleMemory(250);
}

document.addEventListener("visibilitychange", () => {
  clearTimeout(memoryTimer);
  memoryTimer = null;
  scheduleMemory(0);
});

// -- live events ---------------------------------------------------------------------------------

function connectEvents() {
  const conn = $("#conn");
  const source = new EventSource("/api/events");
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn connecting"; };
  let first = true;
  source.onmessage = (ev) => {
    let msg, data;
    try {
      msg = JSON.parse(ev.data);
      data = JSON.parse(msg.data);
    } catch (e) { return; }
    if (msg.type === "modelStatus") {
      models = data;
      renderModels();
      updateSourceOptions();
      memoryStatesChanged(data);
    } else if (msg.type === "metrics") {
      if (first) { requestsBody.replaceChildren(); first = false; }  // a fresh snapshot after reconnect
      addRequests(data);
      if (!requestsBody.rows.length) {
        requestsBody.append(el("tr", { class: "empty" }, el("td", { colspan: 11 }, "no requests yet")));
      }
    }
  };
  source.addEventListener("open", () => { first = true; });
}

// -- logs ----------------------------------------------------------------------------------------

let logAbort = null;
let logLength = 0;
let retryTimer = null;

function atBottom() {
  return logView.scrollTop + logView.clientHeight >= logView.scrollHeight - 8;
}

function appendLog(text) {
  const follow = atBottom();
  let last = 0;
  for (const m of text.matchAll(DROP_MARKER)) {
    appendText(text.slice(last, m.index) + "\n");
    logView.append(el("span", { class: "drop" }, m[0].trim()));
    logLength += m[0].length;
    last = m.index + m[0].length;
    appendText("\n");
  }
  appendText(text.slice(last));
  trimLog();
  if (follow) logView.scrollTop = logView.scrollHeight;
  updateFollow();
}

function appendText(text) {
  if (!text) return;
  const tail = logView.lastChild;
  if (tail && tail.nodeType === Node.TEXT_NODE) tail.appendData(text);
  else logView.append(document.createTextNode(text));
  logLength += text.length;
}

function trimLog() {
  // Oldest output goes first; drop markers are spans, highlighted while they are in view.
  while (logLength > LOG_LIMIT && logView.firstChild) {
    const node = logView.firstChild;
    const excess = logLength - LOG_LIMIT;
    const size = node.textContent.length;
    if (node.nodeType === Node.TEXT_NODE && size > excess) {
      node.deleteData(0, excess);
      logLength -= excess;
    } else {
      node.remove();
      logLength -= size;
    }
  }
}

function updateFollow() {
  const follow = atBottom();
  $("#log-follow").textContent = follow ? "following" : "paused (scrolled up)";
  $("#log-end").hidden = follow;
}

async function openLog() {
  if (logAbort) logAbort.abort();
  clearTimeout(retryTimer);
  const controller = new AbortController();
  logAbort = controller;
  logView.replaceChildren();
  logLength = 0;
  const src = logSource.value;
  const url = src ? `/logs/stream/${modelPath(src)}` : "/logs/stream";
  try {
    const resp = await fetch(url, { signal: controller.signal, headers: { "Accept": "text/plain" } });
    if (!resp.ok) throw new Error(`${resp.status} ${resp.statusText}`);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      appendLog(decoder.decode(value, { stream: true }));
    }
  } catch (e) {
    if (controller.signal.aborted) return;
    appendLog(`\n[ui] log stream error: ${e.message}\n`);
  }
  if (logAbort === controller) {
    retryTimer = setTimeout(() => { if (logAbort === controller) openLog(); }, 2000);
  }
}

// -- start ---------------------------------------------------------------------------------------

$("#unload-all").addEventListener("click", async () => {
  const button = $("#unload-all");
  button.disabled = true;
  notice("unloading every model…");
  try {
    await post("/api/models/unload");
    notice("all models unloaded");
  } catch (e) {
    notice(e.message, true);
  } finally {
    button.disabled = false;
  }
});
logSource.addEventListener("change", openLog);
logView.addEventListener("scroll", updateFollow);
$("#log-end").addEventListener("click", () => { logView.scrollTop = logView.scrollHeight; updateFollow(); });
$("#log-clear").addEventListener("click", () => { logView.replaceChildren(); logLength = 0; updateFollow(); });

fetch("/api/version").then((r) => r.ok ? r.json() : null).then((v) => {
  if (v && v.version) $("#version").textContent = `v${v.version}`;
}).catch(() => {});

async function loadScope() {
  // Without /api/me (an older daemon) the page keeps every action; the daemon still decides.
  try {
    const resp = await fetch("/api/me", { headers: { "Accept": "application/json" }, cache: "no-store" });
    if (resp.ok) me = await resp.json();
  } catch (e) { /* keep the default */ }
  for (const node of document.querySelectorAll(".admin-only")) node.hidden = !me.admin;
  $("#whoami").textContent = me.name ? `key: ${me.name}${me.admin ? "" : " (read-only)"}` : "";
  renderModels();
}

loadScope().then(() => {
  connectEvents();
  if (me.admin) openLog();   // the logs are an admin's: other keys would only get 403s
  scheduleMemory(0);
});
