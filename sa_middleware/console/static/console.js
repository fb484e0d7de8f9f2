// sa-middleware console. Every value from the server is written with textContent (never innerHTML), and control
// and bidirectional-override characters are shown as visible code points, so no data can act as markup or reorder
// what is displayed.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
// what the CLI escapes too: control and format characters (bidi overrides, zero-width, tag characters, the soft
// hyphen), surrogates, private-use and unassigned code points, line and paragraph separators
const CONTROL = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}]/gu;
const PALETTE = ["#c62828", "#6a1b9a", "#1565c0", "#ef6c00", "#00838f", "#ad1457", "#4e342e", "#283593",
                 "#9e9d24", "#37474f", "#d84315", "#5d4037", "#0277bd", "#7b1fa2", "#558b2f", "#f9a825"];
let csrf = null;
let auditQuery = "";
let pending = null;  // the action waiting for its reason
let drawn = {};  // what each part of the page was last drawn from: a part is drawn again only when that changes

function changed(part, data) {
  const text = JSON.stringify(data);
  if (drawn[part] === text) return false;
  drawn[part] = text;
  return true;
}

function show(value) {
  if (value === null || value === undefined) return "";
  return String(value).replace(CONTROL, (c) => "\u27e6U+" + c.codePointAt(0).toString(16).toUpperCase()
    .padStart(4, "0") + "\u27e7");
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = show(text);
  if (cls) node.className = cls;
  return node;
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "";
}

function setStatus(text, error) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = error ? "error" : "";
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({credentials: "same-origin", cache: "no-store"}, options || {}));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) { loggedOut(); throw new Error("not logged in"); }
  if (!resp.ok) throw new Error((body && body.error) || resp.statusText);
  return body;
}

function loggedOut() {
  csrf = null;
  drawn = {};
  document.getElementById("main").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("who").textContent = "";
}

function button(label, action, target) {
  const b = el("button", label, "act");
  b.type = "button";
  b.dataset.action = action;
  b.addEventListener("click", () => ask(label, action, target));
  return b;
}

function renderSessions(sessions) {
  const body = document.querySelector("#sessions tbody");
  const byPrincipal = new Map();  // a principal is an issuer and a subject: one sub may be two principals
  for (const s of sessions) {
    const key = JSON.stringify([s.sub, s.iss || ""]);
    if (!byPrincipal.has(key)) byPrincipal.set(key, []);
    byPrincipal.get(key).push(s);
  }
  const rows = [];
  for (const [key, list] of [...byPrincipal.entries()].sort((a, b) => a[0] < b[0] ? -1 : 1)) {
    const [sub, issuer] = JSON.parse(key);
    const head = el("tr", undefined, "principal");
    head.dataset.principal = sub;
    head.dataset.issuer = issuer;
    const name = el("td", issuer ? sub + " (" + issuer + ")" : sub);
    name.colSpan = 7;
    const actions = el("td");
    const target = issuer ? {sub, issuer} : {sub};  // no issuer: the store's one issuer of sub
    actions.append(button("Rotate", "rotate", target), button("Revoke tokens", "revoke_principal", target),
                   button("Report compromise", "report_compromise", target));
    head.append(name, actions);
    rows.push(head);
    for (const s of list) {
      const tr = el("tr");
      tr.dataset.session = s.session_id;
      const status = el("td", s.status, "status-" + s.status);
      status.dataset.field = "status";
      const client = [s.client, s.user_agent].filter(Boolean).join(" ");
      const acts = el("td");
      if (s.status === "active") acts.append(button("Pause", "pause_session", {session_id: s.session_id}));
      if (s.status === "paused" || s.status === "compromised") {
        acts.append(button("Resume", "resume_session", {session_id: s.session_id}));
      }
      if (s.status !== "revoked") {
        acts.append(button("Revoke", "revoke_session", {session_id: s.session_id}),
                    button("Compromised", "report_compromise", {session_id: s.session_id}));
      }
      const subject = el("td", s.sub);
      subject.dataset.field = "sub";
      tr.append(subject, el("td", s.kind), el("td", s.session_id), status, el("td", s.actor), el("td", client),
                el("td", clock(s.last_seen)), acts);
      rows.push(tr);
    }
  }
  body.replaceChildren(...rows);
  document.getElementById("session-count").textContent = "(" + sessions.length + " active, " +
    byPrincipal.size + " principals)";
}

function renderLocks(locks, now) {
  const rows = locks.map((lock) => {
    const tr = el("tr");
    tr.dataset.lock = lock.key;
    tr.append(el("td", lock.key), el("td", lock.mode), el("td", lock.sub), el("td", lock.session_id),
              el("td", lock.fencing_token), el("td", Math.max(0, lock.expires - now).toFixed(1) + " s"));
    return tr;
  });
  document.querySelector("#locks tbody").replaceChildren(...rows);
  document.getElementById("lock-count").textContent = "(" + locks.length + ")";
}

function renderAudit(records) {
  const rows = records.map((r) => {
    const tr = el("tr");
    tr.append(el("td", clock(r.time)), el("td", r.kind), el("td", r.code), el("td", r.source), el("td", r.sub),
              el("td", r.session_id), el("td", r.route), el("td", r.detail));
    return tr;
  });
  document.querySelector("#audit tbody").replaceChildren(...rows);
}

function colour(code, index) {
  if (code === "admitted") return "#2e7d32";
  if (code === "fail_open") return "#f9a825";
  return PALETTE[index % PALETTE.length];
}

function renderChart(data) {
  const svg = document.getElementById("chart");
  const width = Number(svg.getAttribute("width")), height = Number(svg.getAttribute("height"));
  const codes = Object.keys(data.series).sort((a, b) => (a === "admitted" ? -1 : b === "admitted" ? 1 : a < b ? -1 : 1));
  const n = codes.length ? data.series[codes[0]].length : 60;
  const totals = new Array(n).fill(0);
  for (const code of codes) data.series[code].forEach((v, i) => { totals[i] += v; });
  const top = Math.max(1, ...totals);
  const left = 36, bottom = 18, plotH = height - bottom - 6, barW = (width - left) / n;
  const nodes = [];
  const axis = document.createElementNS(SVG, "text");
  axis.setAttribute("x", 2); axis.setAttribute("y", 14); axis.setAttribute("font-size", "11");
  axis.textContent = String(top);
  nodes.push(axis);
  for (const [label, x] of [["-60 min", left], ["now", width - 24]]) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", height - 4); t.setAttribute("font-size", "11");
    t.textContent = label;
    nodes.push(t);
  }
  const base = document.createElementNS(SVG, "line");
  base.setAttribute("x1", left); base.setAttribute("x2", width); base.setAttribute("y1", height - bottom);
  base.setAttribute("y2", height - bottom); base.setAttribute("stroke", "#99a");
  nodes.push(base);
  const stack = new Array(n).fill(0);
  codes.forEach((code, ci) => {
    data.series[code].forEach((v, i) => {
      if (!v) return;
      const h = v / top * plotH;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", left + i * barW + 1);
      rect.setAttribute("width", Math.max(1, barW - 2));
      rect.setAttribute("y", height - bottom - stack[i] - h);
      rect.setAttribute("height", h);
      rect.setAttribute("fill", colour(code, ci));
      const title = document.createElementNS(SVG, "title");
      title.textContent = show(code) + ": " + v;
      rect.append(title);
      nodes.push(rect);
      stack[i] += h;
    });
  });
  svg.replaceChildren(...nodes);
  const legend = codes.map((code, ci) => {
    const item = el("span");
    const swatch = el("i");
    swatch.style.background = colour(code, ci);
    item.append(swatch, document.createTextNode(show(code) + " " + data.series[code].reduce((a, b) => a + b, 0)));
    return item;
  });
  document.getElementById("legend").replaceChildren(...legend);
}

async function refresh() {
  try {
    const state = await api("api/state");
    csrf = state.csrf;
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    document.getElementById("logout").hidden = false;
    document.getElementById("who").textContent = "operator: " + show(state.operator);
    // a table drawn afresh while the operator clicks in it would lose the click: draw only what changed
    if (changed("sessions", state.sessions)) renderSessions(state.sessions);
    if (changed("locks", [state.locks, state.now])) renderLocks(state.locks, state.now);
    const audit = (await api("api/audit" + auditQuery)).records;
    if (changed("audit", audit)) renderAudit(audit);
    const chart = await api("api/chart");
    if (changed("chart", chart)) renderChart(chart);
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    setStatus(e.message, true);
  }
}

function ask(label, action, target) {
  pending = {action, target};
  document.getElementById("action-title").textContent = label;
  document.getElementById("action-target").textContent = target.session_id ? "session " + show(target.session_id)
    : "principal " + show(target.sub) + (target.issuer ? " of " + show(target.issuer) : "");
  document.getElementById("action-error").textContent = "";
  document.getElementById("action-reason").value = "";
  document.getElementById("dialog").hidden = false;
  document.getElementById("action-reason").focus();
}

async function confirmAction(event) {
  event.preventDefault();
  if (!pending) return;
  const reason = document.getElementById("action-reason").value;
  try {
    const done = await api("api/action", {method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf || ""},
      body: JSON.stringify(Object.assign({action: pending.action, reason}, pending.target))});
    pending = null;
    document.getElementById("dialog").hidden = true;
    await refresh();
    if (done && done.warning) setStatus("warning: " + show(done.warning), true);  // e.g. a rotation no token survives
  } catch (e) {
    document.getElementById("action-error").textContent = e.message;
  }
}

async function login(event) {
  event.preventDefault();
  const token = document.getElementById("login-token").value.trim();
  try {
    await api("api/login", {method: "POST", headers: {"Authorization": "Bearer " + token}});
    document.getElementById("login-token").value = "";
    await refresh();
  } catch (e) {
    setStatus(e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("action-form").addEventListener("submit", confirmAction);
  document.getElementById("action-cancel").addEventListener("click", () => {
    pending = null;
    document.getElementById("dialog").hidden = true;
  });
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("api/logout", {method: "POST", headers: {"X-CSRF-Token": csrf || ""}}); } catch (e) { /* */ }
    loggedOut();
  });
  document.getElementById("audit-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(event.target)) if (v) params.set(k, v);
    auditQuery = params.toString() ? "?" + params.toString() : "";
    refresh();
  });
  refresh();
  setInterval(refresh, POLL_MS);
});
