"""Accessibility basics of every dashboard page, measured in the real browser: names for every control, text
contrast (WCAG AA), headings and titles, and a keyboard-only path through sign-in and navigation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import Dash, sign_in

# In-page audit (audit.js). Contrast: WCAG 2 relative luminance of each text element's colour against the first opaque
# background behind it (walking up the tree); 4.5:1, or 3:1 for large text (>= 24px, or >= 18.66px bold).
AUDIT = (Path(__file__).parent / "audit.js").read_text()

PAGES = [("#/", "Fleet overview"), ("#/models", "Models"), ("#/models/clinical/1.0.0", "clinical 1.0.0"),
         ("#/rollouts", "Rollouts"), ("#/devices", "Devices"), ("#/alerts", "Alerts")]


def test_sign_in_page_passes_the_audit(page: Any, dash: Dash) -> None:
    page.goto(f"{dash.url}/ui/")
    page.get_by_label("API token").wait_for()
    assert page.evaluate(AUDIT) == []


@pytest.mark.parametrize(("route", "title"), PAGES)
def test_page_passes_the_audit(page: Any, dash: Dash, route: str, title: str) -> None:
    sign_in(page, dash, dash.operator, route)
    page.get_by_role("heading", name=title, level=1).wait_for()
    assert page.evaluate(AUDIT) == []
    assert title in page.title()


def test_keyboard_only_sign_in_and_navigation(page: Any, dash: Dash) -> None:
    page.goto(f"{dash.url}/ui/")
    page.get_by_label("API token").wait_for()
    assert page.evaluate("document.activeElement.id") == "token", "the token field has focus on load"
    page.keyboard.type(dash.viewer)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Fleet overview").wait_for()

    assert page.evaluate("document.activeElement.id") == "main", "after signing in, focus is on the content"

    page.reload()  # a fresh load: the token stays in this tab's sessionStorage; focus starts at the top
    page.get_by_role("heading", name="Fleet overview").wait_for()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('main') !== null"), "the skip link jumps to the content"

    page.reload()
    page.get_by_role("heading", name="Fleet overview").wait_for()
    seen = []
    for _ in range(8):  # skip link, then the five nav links in order
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.textContent"))
        if seen[-1] == "Alerts":
            break
    assert seen[:6] == ["Skip to content", "Overview", "Models", "Rollouts", "Devices", "Alerts"], seen
    focus_ring = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focus_ring != "none", "the focused link shows a focus ring"
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Alerts", level=1).wait_for()
    assert page.evaluate("document.activeElement.id") == "main", "focus moves to the new page's content"


def test_the_audit_catches_faint_text_and_unnamed_controls(page: Any, dash: Dash) -> None:
    page.goto(f"{dash.url}/ui/")
    page.get_by_label("API token").wait_for()
    page.evaluate("""() => {
        const p = document.createElement('p'); p.textContent = 'faint text'; p.style.color = '#bbbbbb';
        const i = document.createElement('input'); i.id = 'nameless';
        document.querySelector('main').append(p, i); }""")
    problems = page.evaluate(AUDIT)
    assert any(p.startswith("contrast") and "faint text" in p for p in problems), problems
    assert any("unnamed control <input id=nameless>" in p for p in problems), problems
