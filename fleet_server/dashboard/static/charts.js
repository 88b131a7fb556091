// Small SVG charts with no dependencies. Every chart is a <figure> holding an <svg role="img"> with a text
// description, a visible legend, and a <details> data table, so the numbers are readable without the picture.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
// Colour-blind-safe palette (Okabe-Ito), darkened where needed for 3:1 contrast against white.
export const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8a6d00", "#56B4E9", "#000000", "#E69F00"];

function svgEl(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

let chartSeq = 0;

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en");
  return Number(v.toPrecision(digits)).toString();
}

function frame(title, description, testid) {
  const id = `chart-${++chartSeq}`;
  const fig = h("figure", { class: "chart", "data-testid": testid });
  const cap = h("figcaption", { id: `${id}-title` }, h("strong", { text: title }));
  const svg = svgEl("svg", { viewBox: "0 0 640 220", role: "img", "aria-labelledby": `${id}-title ${id}-desc`,
    preserveAspectRatio: "xMidYMid meet" });
  svg.append(svgEl("desc", { id: `${id}-desc` }, description));
  fig.append(cap, svg);
  return { fig, svg };
}

function table(headers, rows) {
  return h("details", {}, h("summary", { text: "Data table" }),
    h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", text: x })))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", { text: c })))))));
}

function legend(series) {
  // Colours go through the CSSOM: the page's Content-Security-Policy forbids inline style attributes.
  return h("ul", { class: "legend" }, series.map((s, i) => {
    const sw = h("span", { class: `swatch${s.dashed ? " dashed" : ""}`, "aria-hidden": "true" });
    sw.style.setProperty("--c", s.color || PALETTE[i % PALETTE.length]);
    return h("li", {}, sw, s.name);
  }));
}

const M = { l: 56, r: 12, t: 10, b: 34 };

function axes(svg, yMax, yLabel, xLabels) {
  const W = 640 - M.l - M.r, H = 220 - M.t - M.b;
  const g = svgEl("g", { class: "axes" });
  for (let i = 0; i <= 4; i++) {
    const y = M.t + H - (H * i) / 4;
    g.append(svgEl("line", { x1: M.l, x2: M.l + W, y1: y, y2: y, class: "grid" }));
    g.append(svgEl("text", { x: M.l - 6, y: y + 4, "text-anchor": "end" }, fmt((yMax * i) / 4, 2)));
  }
  const n = xLabels.length;
  const step = Math.max(1, Math.ceil(n / 6));
  for (let i = 0; i < n; i += step) {
    const x = M.l + (n === 1 ? W / 2 : (W * i) / (n - 1));
    g.append(svgEl("text", { x, y: M.t + H + 16, "text-anchor": "middle" }, xLabels[i]));
  }
  g.append(svgEl("text", { x: 12, y: M.t + H / 2, transform: `rotate(-90 12 ${M.t + H / 2})`,
    "text-anchor": "middle" }, yLabel));
  svg.append(g);
  return { W, H };
}

// series: [{name, values: [number|null], color?, dashed?}]; x: labels (one per point).
export function lineChart({ title, description, yLabel, x, series, yMin = 0, yMaxFloor = 0, testid }) {
  const { fig, svg } = frame(title, description, testid);
  const all = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const yMax = Math.max(yMaxFloor, ...all, 1e-9) * 1.1;
  const { W, H } = axes(svg, yMax, yLabel, x);
  const px = (i) => M.l + (x.length === 1 ? W / 2 : (W * i) / (x.length - 1));
  const py = (v) => M.t + H - (H * (v - yMin)) / (yMax - yMin);
  series.forEach((s, k) => {
    const color = s.color || PALETTE[k % PALETTE.length];
    let d = "";
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${px(i).toFixed(1)},${py(v).toFixed(1)}`;
      pen = true;
      if (!s.dashed) svg.append(svgEl("circle", { cx: px(i), cy: py(v), r: 2.5, fill: color }));
    });
    if (d) {
      svg.append(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": s.dashed ? 1.5 : 2,
        "stroke-dasharray": s.dashed ? "6 4" : "none", "data-series": s.name }));
    }
  });
  fig.append(legend(series),
    table(["time", ...series.map((s) => s.name)], x.map((t, i) => [t, ...series.map((s) => fmt(s.values[i]))])));
  return fig;
}

// groups: [{label, values: [number]}] drawn as grouped bars; names: the bar names (one per value).
export function barChart({ title, description, yLabel, groups, names, testid, percent = false }) {
  const { fig, svg } = frame(title, description, testid);
  const yMax = Math.max(...groups.flatMap((g) => g.values), 1e-9) * 1.1;
  const { W, H } = axes(svg, percent ? yMax * 100 : yMax, yLabel, []);
  const gw = W / Math.max(groups.length, 1);
  const bw = Math.max(2, (gw * 0.8) / names.length);
  groups.forEach((g, i) => {
    g.values.forEach((v, k) => {
      const bh = (H * v) / yMax;
      svg.append(svgEl("rect", { x: M.l + i * gw + gw * 0.1 + k * bw, y: M.t + H - bh, width: bw - 1, height: bh,
        fill: PALETTE[k % PALETTE.length], "data-series": names[k] }));
    });
    if (groups.length <= 24) {
      svg.append(svgEl("text", { x: M.l + i * gw + gw / 2, y: M.t + H + 16, "text-anchor": "middle",
        class: "tick" }, g.label));
    }
  });
  const show = (v) => (percent ? `${fmt(v * 100)}%` : fmt(v));
  fig.append(legend(names.map((name) => ({ name }))),
    table(["group", ...names], groups.map((g) => [g.label, ...g.values.map(show)])));
  return fig;
}

export { h, fmt };
