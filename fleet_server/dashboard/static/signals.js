// One model version: the four monitoring signals over time, filtered by cohort tag and time range.
"use strict";

import { barChart, fmt, h, lineChart } from "./charts.js";
import { api, badge, clock, heading, qs } from "./core.js";

const RANGES = [["", "since the first window (24 h at most)"], ["15m", "last 15 minutes"], ["1h", "last hour"],
  ["6h", "last 6 hours"], ["24h", "last 24 hours"], ["7d", "last 7 days"], ["30d", "last 30 days"]];
const TOP_FEATURES = 5;

function verdictBadge(v) {
  return badge(v, v === "drift" ? "bad" : v === "ok" ? "ok" : "muted");
}

function filters(name, version, s, params) {
  const tag = params.get("tag") || "";
  const range = params.get("range") || "";
  const tagSel = h("select", { id: "f-tag", name: "tag" }, h("option", { value: "", text: "whole fleet" }),
    ...Object.entries(s.tags).flatMap(([k, vs]) => vs.map((v) =>
      h("option", { value: `${k}=${v}`, text: `${k}=${v}`, selected: tag === `${k}=${v}` }))));
  const rangeSel = h("select", { id: "f-range", name: "range" }, RANGES.map(([v, t]) =>
    h("option", { value: v, text: t, selected: v === range })));
  const form = h("form", { class: "filters", "aria-label": "Filters" },
    h("label", { for: "f-tag" }, "Cohort", tagSel), h("label", { for: "f-range" }, "Time range", rangeSel),
    h("button", { type: "submit", class: "primary", text: "Apply" }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    location.hash = `#/models/${encodeURIComponent(name)}/${encodeURIComponent(version)}${qs({
      tag: tagSel.value, range: rangeSel.value })}`;
  });
  return form;
}

async function showHistogram(target, name, version, feature, params) {
  const hist = await api(`/api/v1/histogram${qs({ model: name, version, feature, tag: params.get("tag"),
    since: params.get("range") || undefined })}`);
  const total = (xs) => xs.reduce((a, b) => a + b, 0) || 1;
  const rt = total(hist.reference);
  const ct = total(hist.current);
  const e = hist.edges;
  const label = (i) => (i === 0 ? `<${fmt(e[0], 2)}` : i === e.length ? `≥${fmt(e[e.length - 1], 2)}` : fmt(e[i - 1], 2));
  const groups = hist.reference.map((r, i) => ({ label: label(i), values: [r / rt, hist.current[i] / ct] }));
  const heading2 = h("h3", { tabindex: "-1", text: `${feature}: reference vs current` });
  target.replaceChildren(heading2, barChart({
    title: `Share of values per bin, ${feature}`, yLabel: "% of values", names: ["reference", "current"], groups,
    percent: true, testid: "histogram",
    description: `Reference (${rt} values) against current (${ct} values) on the reference profile's bins.` }));
  heading2.focus();
}

export async function signalsPage(params, name, version) {
  const since = params.get("range") || undefined;
  const s = await api(`/api/v1/signals${qs({ model: name, version, tag: params.get("tag"), since, buckets: 24 })}`);
  // No version in the address (an alert about the model as a whole): the server chose one, as `drift` does.
  const chosen = version ? "" : ` (${s.version_chosen})`;
  version = s.version;
  const x = s.series.map((p) => clock(p.end));
  const live = s.series.map((p) => p.count > 0);
  const pick = (f) => s.series.map((p, i) => (live[i] ? f(p) : null));
  const o = s.overall;
  const scope = params.get("tag") || "whole fleet";
  const out = h("div", {}, heading(`${name} ${version}${chosen}`),
    h("p", { class: "muted", text: `${scope}: ${s.devices} device(s), ${s.summaries} summaries, ${o.count} predictions `
      + `from ${s.since.replace("T", " ")} to ${s.until.replace("T", " ")}; reference profile of ${s.reference_rows} rows.` }),
    filters(name, version, s, params));

  // 0. which cohorts drift: one row per value of each tag key, linking to the filtered page
  const cohortRows = [];
  const keys = Object.keys(s.tags);
  // One request for every tag key (the server reads the summaries once): ...&by=k1&by=k2 (model is always set)
  const byParams = keys.map((k) => `&by=${encodeURIComponent(k)}`).join("");
  const r = keys.length ? await api(`/api/v1/drift${qs({ model: name, version, since, devices: "none" })}${byParams}`) : {};
  const byKey = keys.length === 1 ? { [keys[0]]: r.cohorts || {} } : (r.cohorts_by || {});
  for (const key of keys) {
    for (const [value, c] of Object.entries(byKey[key] || {})) {
      const feats = c.input_drift.drifted_features;
      cohortRows.push(h("tr", { "data-cohort": `${key}=${value}`, "data-drifted": String(c.input_drift.drifted) },
        h("td", {}, h("a", { href: `#/models/${encodeURIComponent(name)}/${encodeURIComponent(version)}${qs({
          tag: `${key}=${value}`, range: params.get("range") })}`, text: `${key}=${value}` })),
        h("td", { class: "num", text: String(c.devices) }), h("td", { class: "num", text: String(c.count) }),
        h("td", {}, feats.length ? badge(feats.join(", "), "bad") : badge("none", "ok")),
        h("td", {}, c.output_drift.drifted ? badge("drifted", "bad") : badge("stable", "ok")),
        h("td", { class: "num", text: fmt(c.operations.latency_ms.p95) }),
        h("td", { class: "num", text: `${fmt(c.operations.error_rate * 100)}%` })));
    }
  }
  if (cohortRows.length) {
    out.append(h("section", { "aria-labelledby": "sec-cohorts" }, h("h2", { id: "sec-cohorts", text: "Cohorts" }),
      h("table", { "data-testid": "cohorts-table" }, h("thead", {}, h("tr", {}, ["cohort", "devices", "predictions",
        "drifted input features", "output", "p95 ms", "errors"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, cohortRows))));
  }

  // 1. input drift
  const id = o.input_drift;
  const floor = s.policy.input_drift.statistic === "ks" ? s.policy.input_drift.ks_floor : null;
  const worst = id.features.slice(0, TOP_FEATURES).map((f) => f.feature);
  const histBox = h("div", { "aria-live": "polite", "data-testid": "histogram-box" });
  const rows = id.features.map((f) => {
    const btn = h("button", { type: "button", class: "link", text: f.feature, "data-testid": `feature-${f.feature}`,
      "aria-label": `${f.feature}: show reference vs current histogram` });
    btn.addEventListener("click", () => showHistogram(histBox, name, version, f.feature, params));
    return h("tr", { "data-feature": f.feature, "data-verdict": f.verdict }, h("td", {}, btn),
      h("td", { class: "num", text: fmt(f.statistic) }),
      h("td", { class: "num", text: f.p_adjusted === null ? "–" : f.p_adjusted.toExponential(1) }),
      h("td", { class: "num", text: fmt(f.psi) }), h("td", { class: "num", text: String(f.n) }),
      h("td", {}, verdictBadge(f.verdict)));
  });
  out.append(h("section", { "aria-labelledby": "sec-input" },
    h("h2", { id: "sec-input" }, "Input drift ", id.drifted ? badge(`${id.drifted_features.length} feature(s) drifted`, "bad")
      : badge("no drift", "ok")),
    h("p", { class: "muted", text: `${id.statistic.toUpperCase()} per feature against the reference, ${id.correction}-`
      + `corrected at α=${id.alpha}, flagged only above the effect floor. Worst first; pick a feature for its histogram.` }),
    lineChart({ title: `Input drift (${id.statistic}) of the ${worst.length} worst features over time`, yLabel: id.statistic,
      testid: "chart-input-drift", x,
      description: `Drift statistic per time bucket for ${worst.join(", ")}; drifted now: ${id.drifted_features.join(", ") || "none"}.`,
      series: [...worst.map((f) => ({ name: f, values: pick((p) => (p.input[f] ? p.input[f].statistic : null)) })),
        ...(floor === null ? [] : [{ name: `effect floor ${floor}`, values: x.map(() => floor), dashed: true, color: "#4a4a4a" }])] }),
    histBox,
    h("div", {},
      h("table", { "data-testid": "input-drift-table" },
        h("caption", { class: "muted", text: "Features, worst first" }),
        h("thead", {}, h("tr", {}, ["feature", id.statistic, "p (adj.)", "PSI", "n", "verdict"].map((t) =>
          h("th", { scope: "col", text: t })))), h("tbody", {}, rows)))));

  // 2. output drift
  const od = o.output_drift;
  const classes = s.classes;
  out.append(h("section", { "aria-labelledby": "sec-output" },
    h("h2", { id: "sec-output" }, "Output drift ", od.drifted ? badge("drifted", "bad") : badge("no drift", "ok")),
    h("p", { class: "muted", text: `Class mix χ² (Cohen's w ${od.class_mix.cohens_w}) `
      + `${od.class_mix.drifted ? "drifted" : "stable"}; confidence KS ${od.confidence.ks} ${od.confidence.drifted ? "drifted" : "stable"}.` }),
    h("div", {},
      lineChart({ title: "Predicted class mix over time", yLabel: "share", x, testid: "chart-class-mix",
        description: `Share of each predicted class per bucket; reference: ${classes.map((c, i) => `${c} ${od.class_mix.reference_share[i]}`).join(", ")}.`,
        series: [...classes.map((c, i) => ({ name: `class ${c}`, values: pick((p) => p.class_share[i]) })),
          ...classes.map((c, i) => ({ name: `reference ${c}`, values: x.map(() => od.class_mix.reference_share[i]), dashed: true }))] }),
      lineChart({ title: "Confidence distribution shift (KS) over time", yLabel: "KS", x, testid: "chart-confidence",
        description: "KS distance of the confidence histogram from the reference per bucket.",
        series: [{ name: "confidence KS", values: pick((p) => p.confidence_ks) }] }))));

  // 3. latency and errors
  const ops = o.operations;
  out.append(h("section", { "aria-labelledby": "sec-ops" },
    h("h2", { id: "sec-ops", text: "Latency and errors" }),
    h("p", { class: "muted", text: `Whole range: p50 ${fmt(ops.latency_ms.p50)} ms, p95 ${fmt(ops.latency_ms.p95)} ms, `
      + `p99 ${fmt(ops.latency_ms.p99)} ms; error rate ${fmt(ops.error_rate * 100)}%.` }),
    h("div", {},
      lineChart({ title: "Inference latency percentiles", yLabel: "ms", x, testid: "chart-latency",
        description: "p50, p95 and p99 on-device inference latency per bucket, from the devices' histograms.",
        series: ["p50", "p95", "p99"].map((q) => ({ name: q, values: pick((p) => p.latency_ms[q]) })) }),
      lineChart({ title: "Error rate", yLabel: "% of requests", x, testid: "chart-errors", yMaxFloor: 1,
        description: "Rejected or failed requests as a share of all requests per bucket.",
        series: [{ name: "error rate", values: pick((p) => p.error_rate * 100) }] }))));

  // 4. accuracy
  const acc = o.accuracy;
  const trust = acc.trustworthy ? badge("estimate trustworthy", "ok")
    : badge(`estimate untrustworthy: ${fmt(acc.empty_bin_share * 100)}% of values outside the reference`, "bad");
  out.append(h("section", { "aria-labelledby": "sec-acc" },
    h("h2", { id: "sec-acc" }, "Accuracy ", trust),
    h("p", { class: "muted", text: `Measured ${acc.measured ? `${fmt(acc.measured.accuracy)} on ${acc.measured.labels} labels` : "– (no labels fed back)"}; `
      + `estimated without labels ${fmt(acc.estimated)}; reference ${fmt(acc.reference)} (${acc.reference_source || "package"}).` }),
    lineChart({ title: "Accuracy: measured where labelled, estimated elsewhere", yLabel: "accuracy", x, yMaxFloor: 1,
      testid: "chart-accuracy", description: "Measured accuracy (labelled predictions), estimated accuracy (calibration map) and the reference.",
      series: [{ name: "estimated", values: pick((p) => p.accuracy_estimated) },
        { name: "measured", values: pick((p) => p.accuracy_measured) },
        { name: "reference", values: x.map(() => acc.reference), dashed: true, color: "#4a4a4a" }] })));
  return out;
}
