"""The list routes (devices, models, rollouts) are keyset-paged: ``?limit=`` rows per page, an exclusive cursor
(``after`` for the ascending lists, ``before`` for the newest-first rollouts), the body still a JSON list, and
an RFC 8288 ``Link: <...>; rel="next"`` header carrying the same filters while there is a next page. The tag
filter runs in SQL and takes any tag key; bad paging or filter input is a 422 naming it. Real SQLite, the real
app from its factory; the dashboard's rollouts page is checked in the Debian Chromium."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server import devices
from fleet_server.app import create_app
from fleet_server.auth import create_token
from fleet_server.cli import main as fleet_cli
from fleet_server.dashboard import attach_dashboard
from fleet_server.registry import publish
from fleet_server.rollouts import service
from fleet_server.rollouts.routes import attach_rollouts
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.brokers import free_port
from tests.dashboard.conftest import chromium_path
from tests.support import wait_until

LINK_NEXT = re.compile(r'^<([^>]+)>; rel="next"$')


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    store: Store
    settings: ServerSettings
    viewer: dict[str, str]

    def enroll(self, device_id: str, tags: dict[str, str]) -> None:
        devices.enroll(self.store, self.settings.fleet, device_id, public_b64(generate_key().public_key()), tags)

    def pages(self, url: str) -> list[tuple[list[dict[str, Any]], str | None]]:
        """Every page from ``url`` on, following Link rel="next": (body, next URL or None) per page."""
        out: list[tuple[list[dict[str, Any]], str | None]] = []
        next_url: str | None = url
        while next_url is not None:
            r = self.client.get(next_url, headers=self.viewer)
            assert r.status_code == 200, r.text
            link = r.headers.get("link")
            next_url = None
            if link is not None:
                m = LINK_NEXT.match(link)
                assert m, link
                next_url = m.group(1)
            out.append((r.json(), next_url))
            assert len(out) < 50, "the Link header never ends"
        return out


@pytest.fixture()
def api(built: Any, tmp_path: Path) -> Iterator[Api]:
    """An initialised server folder (its fleet key signs rollbacks) with ``clinical 1.0.0`` published, no devices,
    and the app with the rollout routes (its tick thread not started)."""
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    settings = ServerSettings(data_dir=data, broker="none")
    store = Store(settings.db_path)
    publish(store, settings.packages_dir, settings.root_pub, built.package, owner="ml", oncall="http://127.0.0.1:9/x")
    app = create_app(settings, store)
    attach_rollouts(app, app.state.ctx, publish=False)
    viewer = {"Authorization": f"Bearer {create_token(store, 'viewer')}"}
    try:
        yield Api(app, TestClient(app), store, settings, viewer)
    finally:
        store.close()


def _ids(pages: list[tuple[list[dict[str, Any]], str | None]], key: str) -> list[str]:
    return [row[key] for body, _ in pages for row in body]


# ---- devices ---------------------------------------------------------------------------------------------------
def test_paging_25_devices_by_10_gives_each_once_in_order_with_a_link_until_the_last_page(api: Api) -> None:
    names = [f"cam-{i:02d}" for i in range(25)]
    for name in random.Random(4).sample(names, len(names)):  # enrolled out of order
        api.enroll(name, {"site": "a"})
    pages = api.pages("/api/v1/devices?limit=10")
    assert [len(body) for body, _ in pages] == [10, 10, 5]
    assert [link is not None for _, link in pages] == [True, True, False]
    assert pages[0][1] is not None and "after=cam-09" in pages[0][1] and "limit=10" in pages[0][1]
    assert _ids(pages, "device_id") == names
    # without a limit: the default page (1000) holds them all, and says there is no next page
    r = api.client.get("/api/v1/devices", headers=api.viewer)
    assert [d["device_id"] for d in r.json()] == names and "link" not in r.headers


def test_the_tag_filter_pages_with_the_filter_kept_in_the_link(api: Api) -> None:
    for i in range(12):
        api.enroll(f"dev-{i:02d}", {"site": "north" if i % 3 == 0 else "south", "hw": "pi4"})
    pages = api.pages("/api/v1/devices?tag=site%3Dnorth&limit=2")
    assert _ids(pages, "device_id") == ["dev-00", "dev-03", "dev-06", "dev-09"]
    assert [len(body) for body, _ in pages] == [2, 2]
    assert all("tag=site%3Dnorth" in link for _, link in pages if link)
    # a value may itself hold '=': only the first one separates key and value
    api.enroll("dev-eq", {"formula": "a=b"})
    r = api.client.get("/api/v1/devices", params={"tag": "formula=a=b"}, headers=api.viewer)
    assert [d["device_id"] for d in r.json()] == ["dev-eq"]


def test_the_tag_filter_is_in_sql_so_a_limit_counts_only_matching_devices(api: Api) -> None:
    for i in range(10):
        api.enroll(f"dev-{i:02d}", {"site": "north" if i >= 7 else "south"})
    got = devices.list_devices(api.store, ("site", "north"), limit=2)
    assert [d["device_id"] for d in got] == ["dev-07", "dev-08"]  # not the first two rows, filtered afterwards
    assert [d["device_id"] for d in devices.list_devices(api.store, ("site", "north"), after="dev-08")] == ["dev-09"]


WEIRD_KEYS = ['we"ird', "a.b", "a", "$[0]", "x' OR 1 --"]


@pytest.mark.parametrize("key", WEIRD_KEYS)
def test_a_tag_key_holding_quotes_dots_or_path_syntax_matches_only_that_key(api: Api, key: str) -> None:
    """'we"ird' cannot be quoted in an SQLite JSON path, and as a path 'a.b' would look inside the key 'a'."""
    for i, k in enumerate(WEIRD_KEYS):
        api.enroll(f"k{i}-1", {k: "v"})
        api.enroll(f"k{i}-2", {k: "v", "site": "n"})
    api.enroll("decoy", {"we": "v", "ird": "v", "b": "v", "0": "v", "x": "v"})
    pages = api.pages(f"/api/v1/devices?limit=1&tag={quote(key, safe='')}%3Dv")
    i = WEIRD_KEYS.index(key)
    assert _ids(pages, "device_id") == [f"k{i}-1", f"k{i}-2"]
    assert [link is not None for _, link in pages] == [True, False]


@pytest.mark.parametrize("tag", ["site", "=north", ""])
def test_a_tag_filter_that_is_not_key_value_is_a_422_not_every_device(api: Api, tag: str) -> None:
    api.enroll("dev-1", {"site": "north"})
    r = api.client.get("/api/v1/devices", params={"tag": tag}, headers=api.viewer)
    assert r.status_code == 422, r.text
    assert "tag filter" in r.json()["detail"] and "key=value" in r.json()["detail"]


# ---- bad paging input, every list ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/v1/devices", "/api/v1/models", "/api/v1/rollouts"])
@pytest.mark.parametrize("limit", ["0", "10001", "-5", "ten"])
def test_a_limit_outside_1_to_10000_is_a_422_naming_limit(api: Api, path: str, limit: str) -> None:
    r = api.client.get(path, params={"limit": limit}, headers=api.viewer)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request" and [e["loc"] for e in body["errors"]] == [["query", "limit"]]
    assert body["detail"].startswith("query limit: ") and f"(got '{limit}')" in body["detail"]


# ---- models ----------------------------------------------------------------------------------------------------
def test_models_page_by_name_each_as_its_own_page_shows_it(api: Api) -> None:
    # more models: clinical's rows under other names (its real signed manifest), in the same store
    for name in ("zeta", "alpha", "delta", "beta"):
        with api.store.write() as c:
            c.execute("INSERT INTO models SELECT ?, owner, oncall, retrain_every_s, last_retrained, retrain_hook,"
                      " retrain_on_drift, alert_rules, created FROM models WHERE name = 'clinical'", (name,))
            c.execute("INSERT INTO model_versions SELECT ?, version, target, sha256, length, path, manifest, profile,"
                      " calibration, published FROM model_versions WHERE name = 'clinical'", (name,))
    pages = api.pages("/api/v1/models?limit=2")
    assert [[m["name"] for m in body] for body, _ in pages] == [["alpha", "beta"], ["clinical", "delta"], ["zeta"]]
    assert [link is not None for _, link in pages] == [True, True, False]
    assert pages[0][1] is not None and "after=beta" in pages[0][1]
    for body, _ in pages:
        for m in body:
            shown = api.client.get(f"/api/v1/models/{m['name']}", headers=api.viewer).json()
            assert m == shown
            assert m["versions"][0]["version"] == "1.0.0" and m["versions"][0]["lineage"]


# ---- rollouts --------------------------------------------------------------------------------------------------
def _rollbacks(api: Api, created: list[float]) -> list[str]:
    """One completed rollback (to clinical 1.0.0, of no device) created at each time; their ids."""
    signer = service.DesiredSigner.from_settings(api.settings)
    return [service.rollback(api.store, signer, "clinical", "1.0.0", {"site": "nowhere"}, "test", now=t)
            for t in created]


def test_rollouts_page_newest_first_with_before_and_ties_split_across_pages(api: Api) -> None:
    created = [100.0, 200.0, 200.0, 200.0, 300.0, 400.0, 400.0]
    ids = _rollbacks(api, created)
    newest_first = [rid for _, rid in sorted(zip(created, ids, strict=True), reverse=True)]
    pages = api.pages("/api/v1/rollouts?limit=2")
    assert [len(body) for body, _ in pages] == [2, 2, 2, 1]  # the three at t=200 span pages 2 and 3
    assert [link is not None for _, link in pages] == [True, True, True, False]
    assert pages[0][1] is not None and f"before={newest_first[1]}" in pages[0][1]
    assert _ids(pages, "id") == newest_first
    assert [r["id"] for r in service.list_rollouts(api.store)] == newest_first  # the CLI's call: every rollout


def test_a_before_that_is_not_a_rollout_id_is_a_422_naming_it(api: Api) -> None:
    _rollbacks(api, [100.0])
    r = api.client.get("/api/v1/rollouts", params={"before": "r-nothere"}, headers=api.viewer)
    assert r.status_code == 422, r.text
    assert "before='r-nothere'" in r.json()["detail"]


# ---- the dashboard ---------------------------------------------------------------------------------------------
def test_the_dashboard_lists_every_rollout_past_the_first_page(api: Api) -> None:
    """1,003 rollouts: the page follows the Link header past the default page of 1,000."""
    from playwright.sync_api import sync_playwright

    first = _rollbacks(api, [1000.0])[0]
    row = dict(api.store.one("SELECT * FROM rollouts WHERE id = ?", (first,)) or {})
    cols = list(row)
    copies = [tuple({**row, "id": f"rb-copy{i:04d}", "created": 1000.0 + i}[k] for k in cols) for i in range(1, 1003)]
    with api.store.write() as c:
        c.executemany(f"INSERT INTO rollouts ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", copies)
    attach_dashboard(api.app, api.app.state.ctx)
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, 20), "uvicorn did not start"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                requests: list[str] = []
                page.on("request", lambda r: requests.append(r.url))
                page.goto(f"http://127.0.0.1:{server.config.port}/ui/#/rollouts")
                page.get_by_label("API token").fill(api.viewer["Authorization"].removeprefix("Bearer "))
                page.get_by_role("button", name="Sign in").click()
                table = page.get_by_test_id("rollouts-table")
                table.wait_for()
                assert table.locator("tbody tr").count() == 1003
                assert table.get_by_role("link", name=first).count() == 1  # the oldest, on the second page
                assert any("before=" in u for u in requests), requests
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(20)


def test_a_rollouts_page_is_a_range_read_of_an_index_not_a_sort_of_the_table(tmp_path: Any) -> None:
    from fleet_server.store import Store

    store = Store(tmp_path / "fleet.sqlite")
    plan = " ".join(str(r[-1]) for r in store.query(
        "EXPLAIN QUERY PLAN SELECT id FROM rollouts WHERE (created, id) < (?, ?) ORDER BY created DESC, id DESC"
        " LIMIT ?", (0.0, "r-x", 10)))
    store.close()
    assert "rollouts_created" in plan and "TEMP B-TREE" not in plan, plan
