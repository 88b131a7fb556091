// Sign-in, fleet overview, models, devices and alerts pages.
"use strict";

import { barChart, h } from "./charts.js";
import {
  actionButton, ago, api, badge, heading, link, qs, refresh, resultText, session, simpleTable, versionOf, when,
} from "./core.js";

// Alert severities (fleet_server/alerts/rules.py SEVERITY) as badge styles.
const SEVERITY_BADGE = { critical: "bad", warning: "warn", info: "" };

export function loginPage(onToken) {
  document.title = "Sign in · edgefleet";
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true,
    "aria-describedby": "token-help" });
  const form = h("form", { class: "login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title", text: "Sign in" }),
    h("label", { for: "token" }, "API token", input),
    h("p", { id: "token-help", class: "muted",
      text: "A token from `fleet-server tokens create --role viewer|operator|admin`. It is kept in this tab only." }),
    h("button", { type: "submit", class: "primary", text: "Sign in" }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    onToken(input.value.trim());
  });
  queueMicrotask(() => input.focus());
  return form;
}

function card(n, label, testid) {
  return h("div", { class: "card", "data-testid": testid }, h("span", { class: "n", text: String(n) }),
    h("span", { class: "l", text: label }));
}

function onlineBadge(d) {
  return d.online ? badge("online", "ok") : badge("offline", "muted");
}

function deviceRows(list) {
  return list.map((d) => [link(`#/devices/${encodeURIComponent(d.device_id)}`, d.device_id),
    Object.entries(d.tags).map(([k, v]) => `${k}=${v}`).join(", ") || "–", d.running, onlineBadge(d),
    ago(d.last_seen), d.update_state || "–", resultText(d.last_result)]);
}

const DEVICE_HEADERS = ["device", "tags", "running", "link", "last seen", "update", "last install"];

export async function overviewPage() {
  const o = await api("/api/v1/overview");
  const d = o.devices;
  const out = h("div", {}, heading("Fleet overview"),
    h("div", { class: "cards" },
      card(d.total, "devices", "devices-total"), card(d.online, "online", "devices-online"),
      card(d.offline, `offline (not seen for ${Math.round(o.offline_after_s / 60)} min)`, "devices-offline"),
      card(o.alerts.open, "open alerts", "alerts-open"), card(o.alerts.acknowledged, "acknowledged alerts"),
      card(o.rollouts.length, "active rollouts", "rollouts-active"),
      ...(d.revoked ? [card(d.revoked, "revoked (not counted above)", "devices-revoked")] : [])));
  const versions = Object.entries(d.by_version);
  out.append(h("h2", { text: "Devices by running version" }),
    barChart({ title: "Devices per version", description: versions.map(([v, n]) => `${v}: ${n}`).join("; "),
      yLabel: "devices", groups: versions.map(([v, n]) => ({ label: v, values: [n] })), names: ["devices"],
      testid: "chart-versions" }));
  for (const [tag, counts] of Object.entries(d.by_tag)) {
    out.append(h("h2", { text: `Devices by ${tag}` }),
      simpleTable([tag, "devices"], Object.entries(counts).map(([v, n]) => [
        link(`#/devices?tag=${encodeURIComponent(`${tag}=${v}`)}`, v), n]), { "data-testid": `by-${tag}` }));
  }
  out.append(h("h2", { text: "Active rollouts" }), o.rollouts.length
    ? simpleTable(["rollout", "model", "version", "state", "stage"], o.rollouts.map((r) => [
      link(`#/rollouts/${encodeURIComponent(r.id)}`, r.id), r.model, r.version, r.state,
      `${r.stage} of ${r.stages.length}`]))
    : h("p", { class: "muted", text: "No rollout in progress." }));
  out.append(h("h2", { text: "Open and acknowledged alerts" }), o.alerts.list.length
    ? simpleTable(["alert", "model", "kind", "state", "summary"], o.alerts.list.map((a) => [
      link("#/alerts", `#${a.id}`), `${a.model} ${a.version || ""}`, a.kind,
      a.state, a.summary]), { "data-testid": "overview-alerts" })
    : h("p", { class: "muted", text: "No open alerts." }));
  out.append(h("h2", { text: "Models" }), simpleTable(["model", "owner", "versions"], o.models.map((m) => [
    m.name, m.owner, h("span", {}, ...m.versions.flatMap((v, i) => [i ? ", " : "",
      link(`#/models/${encodeURIComponent(m.name)}/${encodeURIComponent(v)}`, v)]))])));
  out.append(h("h2", { text: "Devices" }), simpleTable(DEVICE_HEADERS, deviceRows(d.list)));
  return out;
}

export async function modelsPage() {
  // One page: a fleet has a handful of models, far under the list's default page of 1000 (rollouts.js, whose
  // history does grow past a page, follows the Link header instead).
  const models = await api("/api/v1/models");
  // the largest whole unit, as `models show` prints it (edgefleet_contracts.timeutil.duration_text)
  const days = (s) => {
    if (!s) return "–";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) if (s % size === 0) return `${s / size} ${unit}`;
    return `${s} s`;
  };
  return h("div", {}, heading("Models"), simpleTable(["model", "owner", "on-call route", "retrain every",
    "retraining", "versions"],
    models.map((m) => [m.name, m.owner, m.oncall, days(m.retrain_every_s),
      m.retrain_overdue ? badge("overdue", "bad") : (m.retrain_due ? `due ${when(m.retrain_due)}` : "–"),
      h("span", {}, ...(m.versions || []).flatMap((v, i) => [i ? ", " : "",
        link(`#/models/${encodeURIComponent(m.name)}/${encodeURIComponent(v.version)}`, v.version)]))])));
}

export async function devicesPage(params) {
  const tag = params.get("tag") || "";
  const o = await api("/api/v1/overview");
  const list = o.devices.list.filter((d) => {
    if (!tag) return true;
    const at = tag.indexOf("=");  // split at the first "=" only: a value may hold "=" (the tag contract)
    return at > 0 && d.tags[tag.slice(0, at)] === tag.slice(at + 1);
  });
  const select = h("select", { id: "device-tag", name: "tag" }, h("option", { value: "", text: "all devices" }),
    ...Object.entries(o.devices.by_tag).flatMap(([k, counts]) => Object.keys(counts).map((v) =>
      h("option", { value: `${k}=${v}`, text: `${k}=${v}`, selected: tag === `${k}=${v}` }))));
  select.addEventListener("change", () => { location.hash = `#/devices${qs({ tag: select.value })}`; });
  return h("div", {}, heading(tag ? `Devices (${tag})` : "Devices"),
    h("form", { class: "filters" }, h("label", { for: "device-tag" }, "Cohort", select)),
    h("p", { class: "muted", text: `${list.length} device(s); ${list.filter((d) => d.online).length} online.` }),
    simpleTable(DEVICE_HEADERS, deviceRows(list), { "data-testid": "devices-table" }));
}

export async function deviceDetail(_params, id) {
  const enc = encodeURIComponent(id);
  const [d, history, windows] = await Promise.all([api(`/api/v1/devices/${enc}`),
    api(`/api/v1/devices/${enc}/history`), api(`/api/v1/devices/${enc}/windows`)]);
  const rep = d.reported || {};
  const state = d.state === "revoked"
    ? h("p", { class: "badge bad", "data-testid": "device-state", "data-state": "revoked",
      text: `Revoked ${when(d.revoked)}: ${d.revoked_reason}. Its messages are refused; rollouts skip it.` })
    : h("p", { class: "muted", "data-testid": "device-state", "data-state": "active", text: "Active." });
  return h("div", {}, heading(`Device ${id}`), state,
    h("h2", { text: "Reported state" }),
    h("dl", { class: "kv", "data-testid": "reported" },
      h("dt", { text: "active" }), h("dd", { text: versionOf(rep.active) }),
      h("dt", { text: "standby" }), h("dd", { text: versionOf(rep.standby) }),
      h("dt", { text: "update state" }), h("dd", { text: rep.update_state || "–" }),
      h("dt", { text: "last install" }), h("dd", { text: resultText(rep.last_result) }),
      h("dt", { text: "reported at" }), h("dd", { text: rep.at || "–" }),
      h("dt", { text: "agent" }), h("dd", { text: rep.agent_version || "–" }),
      h("dt", { text: "target" }), h("dd", { text: rep.target || "–" }),
      h("dt", { text: "last seen" }), h("dd", { text: `${ago(d.last_seen)} (${when(d.last_seen)})` }),
      h("dt", { text: "tags" }), h("dd", { text: Object.entries(d.tags).map(([k, v]) => `${k}=${v}`).join(", ") }),
      h("dt", { text: "enrolled" }), h("dd", { text: when(d.enrolled) })),
    h("h2", { text: "Install history" }), history.length
      ? simpleTable(["received", "reported at", "active", "standby", "result"], history.map((e) => [
        when(e.received), e.at, versionOf(e.active), versionOf(e.standby), resultText(e.last_result)]),
      { "data-testid": "install-history" })
      : h("p", { class: "muted", text: "No reported state yet." }),
    h("h2", { text: "Recent windows" }), windows.length
      ? simpleTable(["seq", "version", "window", "predictions", "errors", "p95 latency"], windows.map((w) => [
        w.seq, `${w.model} ${w.version}`, `${w.start} → ${w.end.slice(11)}`, w.count,
        Object.entries(w.errors).map(([k, v]) => `${k}: ${v}`).join(", ") || "0",
        w.p95_ms === null ? "–" : `${w.p95_ms.toFixed(3)} ms`]), { "data-testid": "recent-windows" })
      : h("p", { class: "muted", text: "No summaries received from this device yet." }));
}

const ALERT_STATES = [["active", "Open and acknowledged"], ["open", "Open"], ["acknowledged", "Acknowledged"],
  ["resolved", "Resolved"], ["", "All"]];

export async function alertsPage(params) {
  const state = params.has("state") ? params.get("state") : "active";
  const [list, models] = await Promise.all([api(`/api/v1/alerts${qs({ state: state === "all" ? "" : state })}`),
    api("/api/v1/models")]);
  const owner = Object.fromEntries(models.map((m) => [m.name, m]));
  const select = h("select", { id: "alert-state", name: "state" }, ALERT_STATES.map(([v, t]) =>
    h("option", { value: v, text: t, selected: v === state || (v === "" && state === "all") })));
  select.addEventListener("change", () => { location.hash = `#/alerts${qs({ state: select.value || "all" })}`; });
  const rows = list.map((a) => {
    const m = owner[a.model] || {};
    const acts = h("div", { class: "actions" });
    if (a.state === "open") {
      acts.append(actionButton("Acknowledge", async () => {
        await api(`/api/v1/alerts/${a.id}/ack`, { method: "POST" });
        refresh();
      }, { testid: `ack-${a.id}` }));
    }
    if (a.state !== "resolved") {
      acts.append(actionButton("Resolve", async () => {
        await api(`/api/v1/alerts/${a.id}/resolve`, { method: "POST" });
        refresh();
      }, { testid: `resolve-${a.id}` }));
    }
    const delivery = a.delivery || {};
    const dkind = { delivered: "ok", failed: "bad", not_sent: "muted" }[delivery.state] || "warn";
    return h("tr", { id: `alert-${a.id}`, "data-testid": "alert-row" },
      h("td", { text: `#${a.id}` }),
      h("td", {}, link(`#/models/${encodeURIComponent(a.model)}/${encodeURIComponent(a.version || "")}`,
        `${a.model} ${a.version || ""}`)),
      h("td", { text: a.kind }), h("td", {}, badge(a.severity, SEVERITY_BADGE[a.severity] || "warn")),
      h("td", { text: a.summary }),
      h("td", { text: `${m.owner || "–"}` }),
      h("td", {}, badge(delivery.state || "–", dkind),
        h("span", { class: "muted", text: ` ${delivery.attempts || 0} attempt(s)${delivery.last_error ? `; ${delivery.last_error}` : ""}` })),
      h("td", {}, badge(a.state, a.state === "open" ? "bad" : a.state === "resolved" ? "ok" : "warn"),
        a.acknowledged_by ? h("span", { class: "muted", text: ` by ${a.acknowledged_by}` }) : null),
      h("td", { text: when(a.created) }),
      h("td", {}, acts));
  });
  const note = session.canAct ? null
    : h("p", { class: "muted", text: `Signed in as ${session.role}: acknowledging and resolving need the operator role.` });
  return h("div", {}, heading("Alerts"),
    h("form", { class: "filters" }, h("label", { for: "alert-state" }, "State", select)), note,
    list.length ? simpleTable(["id", "model", "kind", "severity", "summary", "owner", "route delivery", "state",
      "opened", "actions"], rows, { "data-testid": "alerts-table" })
      : h("p", { class: "muted", text: "No alerts in this state." }));
}
