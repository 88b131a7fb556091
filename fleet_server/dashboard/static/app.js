// The dashboard shell: sign-in, navigation (hash routes), and the page registry.
"use strict";

import { h } from "./charts.js";
import { api, ApiError, session, setStatus } from "./core.js";
import { alertsPage, deviceDetail, devicesPage, loginPage, modelsPage, overviewPage } from "./pages.js";
import { rolloutDetail, rolloutsPage } from "./rollouts.js";
import { signalsPage } from "./signals.js";

const routes = [
  [/^\/$/, overviewPage],
  [/^\/models$/, modelsPage],
  [/^\/models\/([^/]+)\/([^/]*)$/, signalsPage],  // an empty version: the server chooses (an alert about the model)
  [/^\/rollouts$/, rolloutsPage],
  [/^\/rollouts\/([^/]+)$/, rolloutDetail],
  [/^\/devices$/, devicesPage],
  [/^\/devices\/([^/]+)$/, deviceDetail],
  [/^\/alerts$/, alertsPage],
];

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { path, params: new URLSearchParams(query || "") };
}

function markNav(path) {
  for (const a of document.querySelectorAll("header nav a")) {
    const target = a.getAttribute("href").slice(1);
    const current = target === "/" ? path === "/" : path === target || path.startsWith(`${target}/`);
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function renderWho() {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (!session.role) return;
  const out = h("button", { type: "button", text: "Sign out" });
  out.addEventListener("click", () => {
    session.token = null;
    session.role = null;
    location.hash = "#/";
    render();
  });
  who.append(h("span", { "data-testid": "signed-in", text: `${session.name} (${session.role})` }), out);
}

async function ensureSession() {
  if (!session.token) return false;
  if (session.role) return true;
  try {
    const me = await api("/api/v1/whoami");
    session.name = me.name;
    session.role = me.role;
    return true;
  } catch (e) {
    session.token = null;
    if (e instanceof ApiError && e.status === 401) setStatus(`Signed out: ${e.message}`);
    else setStatus(`Could not reach the server: ${e.message}`);
    return false;
  }
}

// Focus moves to the new content after an in-app navigation (screen readers announce it); on a fresh page load
// it stays at the document start, so the first Tab reaches the skip link.
let moveFocus = false;

export async function render() {
  const main = document.getElementById("main");
  const { path, params } = parseHash();
  markNav(path);
  if (!(await ensureSession())) {
    renderWho();
    if (session.flash) setStatus(session.flash);
    session.flash = null;
    main.replaceChildren(loginPage(async (token) => {
      session.token = token;
      if (await ensureSession()) {
        setStatus("");
        moveFocus = true;
        await render();
      }
    }));
    return;
  }
  renderWho();
  for (const [re, page] of routes) {
    const m = path.match(re);
    if (!m) continue;
    main.replaceChildren(h("p", { class: "muted", text: "Loading…" }));
    try {
      const node = await page(params, ...m.slice(1).map(decodeURIComponent));
      main.replaceChildren(node);
      setStatus(session.flash || "");
      session.flash = null;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        session.token = null;
        session.role = null;
        setStatus(`Signed out: ${e.message}`);
        return render();
      }
      main.replaceChildren(h("h1", { text: "Something went wrong" }), h("p", { text: e.message }));
    }
    if (moveFocus) main.focus();
    return;
  }
  main.replaceChildren(h("h1", { text: "Not found" }), h("p", { text: `No page at ${path}.` }));
}

// The skip link must not become a route change (the router owns the hash): it only moves focus.
document.querySelector("a.skip").addEventListener("click", (ev) => {
  ev.preventDefault();
  document.getElementById("main").focus();
});

window.addEventListener("hashchange", () => {
  moveFocus = true;
  render();
});
render();
