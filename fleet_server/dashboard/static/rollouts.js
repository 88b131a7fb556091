// Rollouts: the list, and one rollout's stages, devices per state, gates against thresholds, the decision log
// and the operator's pause / resume / approve / abort.
"use strict";

import { fmt, h } from "./charts.js";
import { actionButton, api, ApiError, badge, heading, link, refresh, session, simpleTable, when } from "./core.js";

const TERMINAL = ["completed", "aborted", "rolled_back", "failed"];

function stateBadge(state) {
  const kind = state === "completed" ? "ok" : ["aborted", "rolled_back", "failed"].includes(state) ? "bad"
    : state === "running" ? "" : "warn";
  return badge(state.replace("_", " "), kind);
}

// The URL of an RFC 8288 `Link` header's rel="next" target, or null on the last page.
function nextLink(header) {
  const m = /<([^>]*)>\s*;\s*rel="?next"?/.exec(header || "");
  return m ? m[1] : null;
}

// Every row of a paged list route, following its Link rel="next" pages (as api(), which gives the body only).
// Rollouts accumulate: their history outgrows one page (1000 by default), and this page lists all of it.
async function apiAll(path) {
  let rows = [];
  for (let url = path; url; ) {
    const headers = { Accept: "application/json" };
    if (session.token) headers.Authorization = `Bearer ${session.token}`;
    const res = await fetch(url, { headers });
    let doc = null;
    try { doc = await res.json(); } catch { doc = null; }
    if (!res.ok) {
      const detail = doc && (doc.detail || doc.error);
      throw new ApiError(res.status, doc && doc.error, typeof detail === "string" ? detail : `HTTP ${res.status}`);
    }
    rows = rows.concat(doc);
    url = nextLink(res.headers.get("Link"));
  }
  return rows;
}

export async function rolloutsPage() {
  const list = await apiAll("/api/v1/rollouts");
  return h("div", {}, heading("Rollouts"), list.length
    ? simpleTable(["rollout", "kind", "model", "version", "state", "stage", "created"], list.map((r) => [
      link(`#/rollouts/${encodeURIComponent(r.id)}`, r.id), r.kind, r.model, r.version, stateBadge(r.state),
      `${r.stage} of ${r.stages.length} (${r.stages.join("% → ")}%)`, when(r.created)]), { "data-testid": "rollouts-table" })
    : h("p", { class: "muted", text: "No rollouts yet. Start one with `fleet-server rollout start` or the API." }));
}

function confirmAbort(r) {
  const box = h("div", { class: "actions" });
  const abort = actionButton("Abort rollout", async () => {
    const yes = actionButton(`Yes, abort and send ${r.targeted} device(s) back to ${r.previous || "their previous version"}`,
      async () => {
        await api(`/api/v1/rollouts/${encodeURIComponent(r.id)}/abort`, { method: "POST" });
        refresh();
      }, { kind: "danger", testid: "confirm-abort" });
    const no = h("button", { type: "button", text: "Keep it running" });
    no.addEventListener("click", () => refresh());
    box.replaceChildren(yes, no);
    yes.focus();
  }, { kind: "danger", testid: "abort" });
  box.append(abort);
  return box;
}

function controls(r) {
  if (TERMINAL.includes(r.state)) return h("p", { class: "muted", text: `This rollout is ${r.state.replace("_", " ")}.` });
  const act = (action, label, kind) => actionButton(label, async () => {
    await api(`/api/v1/rollouts/${encodeURIComponent(r.id)}/${action}`, { method: "POST" });
    refresh();
  }, { kind, testid: action });
  const row = h("div", { class: "actions", role: "group", "aria-label": "Rollout actions" });
  if (r.state === "awaiting_approval") row.append(act("approve", `Approve stage ${r.stage}`, "primary"));
  if (r.state === "paused") row.append(act("resume", "Resume", "primary"));
  else row.append(act("pause", "Pause", ""));
  row.append(confirmAbort(r));
  const out = h("div", {}, row);
  if (!session.canAct) {
    out.append(h("p", { class: "muted", "data-testid": "role-note",
      text: `Signed in as ${session.role}: these actions need the operator role.` }));
  }
  return out;
}

function gatesTable(decisions) {
  const last = [...decisions].reverse().find((d) => d.evidence && Array.isArray(d.evidence.gates));
  if (!last) return h("p", { class: "muted", text: "No gate evaluated yet: gates are judged at the end of each stage's bake time." });
  return h("div", {}, h("p", { class: "muted", text: `Last evaluated ${when(last.at)} at stage ${last.evidence.stage} (${last.evidence.percent}%): ${last.detail}` }),
    simpleTable(["gate", "value", "threshold", "result", "detail"], last.evidence.gates.map((g) => [
      g.name, g.value === null ? "–" : fmt(g.value), fmt(g.threshold), badge(g.passed ? "pass" : "fail", g.passed ? "ok" : "bad"),
      g.detail]), { "data-testid": "gates-table" }));
}

export async function rolloutDetail(_params, id) {
  const r = await api(`/api/v1/rollouts/${encodeURIComponent(id)}`);
  const stages = h("ol", { class: "stages", "aria-label": "Stages" }, r.stages.map((p, i) => h("li", {
    class: i + 1 < r.stage || r.state === "completed" ? "done" : i + 1 === r.stage ? "current" : "",
    "aria-current": i + 1 === r.stage && !TERMINAL.includes(r.state) ? "step" : null,
    text: `${i + 1}: ${p}%${r.approve_stages.includes(i + 1) ? " (approval)" : ""}` })));
  const cohort = Object.entries(r.cohort).map(([k, v]) => `${k}=${v}`).join(", ") || "whole fleet";
  return h("div", {}, heading(`Rollout ${r.id}`),
    h("p", {}, stateBadge(r.state), ` ${r.kind} of ${r.model} ${r.version} (from ${r.previous || "nothing"}) to ${cohort}; `
      + `stage ${r.stage} of ${r.stages.length}, bake ${r.bake_seconds} s, ${r.targeted} device(s) targeted so far.`),
    h("div", { "data-testid": "rollout-state", "data-state": r.state, class: "muted", text: `state: ${r.state}` }),
    stages, controls(r),
    h("h2", { text: "Devices per state" }),
    simpleTable(["state", "devices"], Object.entries(r.devices).map(([k, v]) => [k.replaceAll("_", " "), v]),
      { "data-testid": "rollout-devices" }),
    h("h2", { text: "Gates" }), gatesTable(r.decisions),
    h("h2", { text: "Thresholds" }),
    simpleTable(["threshold", "value"], Object.entries(r.thresholds).map(([k, v]) => [k.replaceAll("_", " "), fmt(v)])),
    h("h2", { text: "Decision log" }),
    simpleTable(["time", "actor", "decision", "detail"], r.decisions.map((d) => [when(d.at), d.actor, d.kind, d.detail]),
      { "data-testid": "decision-log" }));
}
