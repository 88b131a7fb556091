// Shared by every page: the API client (bearer token from sessionStorage), the signed-in role, small DOM and
// formatting helpers.
"use strict";

import { h } from "./charts.js";

const TOKEN_KEY = "edgefleet.token";

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(v) { if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY); },
  name: null,
  role: null,
  flash: null,  // a message for the status line once the next page has rendered (render() shows it)
  get canAct() { return this.role === "operator" || this.role === "admin"; },
};

export class ApiError extends Error {
  constructor(status, reason, detail) {
    super(detail || reason || `HTTP ${status}`);
    this.status = status;
    this.reason = reason;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let doc = null;
  try { doc = await res.json(); } catch { doc = null; }
  if (!res.ok) {
    const detail = doc && (doc.detail || doc.error);
    throw new ApiError(res.status, doc && doc.error, typeof detail === "string" ? detail : `HTTP ${res.status}`);
  }
  return doc;
}

export function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : "";
}

export function setStatus(text) {
  document.getElementById("status").textContent = text || "";
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind || ""}`, text });
}

export function ago(epochSeconds) {
  if (epochSeconds === null || epochSeconds === undefined) return "never";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function clock(iso) {
  return iso ? iso.slice(11, 19) : "–";
}

export function when(t) {
  if (t === null || t === undefined) return "–";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

export function link(href, text) {
  return h("a", { href, text });
}

export function simpleTable(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", text: x })))),
    h("tbody", {}, rows.map((r) => (r instanceof HTMLElement ? r : h("tr", {}, r.map((c) =>
      (c instanceof Node ? h("td", {}, c) : h("td", { text: c === null || c === undefined ? "–" : String(c) }))))))));
}

export function versionOf(slot) {
  return slot ? `${slot.name} ${slot.version}` : "–";
}

export function resultText(r) {
  if (!r) return "–";
  return [r.status, r.version, r.reason].filter(Boolean).join(" · ");
}

export function heading(text) {
  document.title = `${text} · edgefleet`;
  return h("h1", { text });
}

// A button that runs an action and reports failure in the status line; disabled for roles that cannot act.
export function actionButton(label, onClick, { kind = "", testid, needs = "operator" } = {}) {
  const b = h("button", { type: "button", class: kind, "data-testid": testid, text: label });
  if (needs === "operator" && !session.canAct) {
    b.disabled = true;
    b.title = `needs the operator role; you are signed in as ${session.role}`;
  }
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await onClick();
    } catch (e) {
      if (e.status === 401) {  // the token was revoked or expired meanwhile: sign out, say why
        session.token = null;
        session.role = null;
        session.flash = `Signed out: ${e.message}`;
        refresh();
        return;
      }
      if (e.status === 409) {  // the page was stale (another operator acted): show what is true now
        session.flash = `${label} failed: ${e.message}`;
        refresh();
        return;
      }
      setStatus(`${label} failed: ${e.message}`);
      b.disabled = false;
    }
  });
  return b;
}

// Re-render the current page (after an action changed what it shows).
export function refresh() {
  window.dispatchEvent(new HashChangeEvent("hashchange"));
}
