"""Dashboard fixtures: one real fleet (Mosquitto, the server process, six real agents with real data) per module,
and a headless Chromium (the Debian ``chromium`` package) driven by Playwright — no browser download."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fleet_server.simulator import Fleet, Receiver, SimConfig
from tests.brokers import Mosquitto
from tests.e2e.conftest import ROOT, Server, cli, free_port

ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
SHIFTED = [0, 2]  # the columns whose inputs shift on site north (features f0 and f2 of the tiny clinical model)


def chromium_path() -> str:
    """The system Chromium (installed by `make test` through .ci/system-deps); a clear failure otherwise."""
    path = os.environ.get("EDGEFLEET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise AssertionError("Chromium not found: install the `chromium` package (`make system-deps` does it as root)"
                             " or set EDGEFLEET_CHROMIUM to its executable")
    return path


@dataclass
class Dash:
    server: Server
    fleet: Fleet
    receiver: Receiver
    operator: str
    viewer: str

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {token or self.operator}"})

    def active_rollout(self) -> str:
        """An active rollout of clinical 2.0.0 to site east, baking its first stage (50%: one device) for ten
        minutes, started when there is none."""
        with self.api() as api:
            for r in api.get("/api/v1/rollouts").json():
                if r["state"] not in ("completed", "aborted", "rolled_back", "failed"):
                    return str(r["id"])
            r = api.post("/api/v1/rollouts", json={"model": "clinical", "version": "2.0.0", "stages": "50,100",
                                                   "bake_seconds": 600,
                                                   "cohort": {"site": "east"}})
            assert r.status_code == 200, r.text
            return str(r.json()["id"])


@pytest.fixture(scope="module")
def dash(built: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    from model_packager.build import BuildRequest, build_package

    tmp = tmp_path_factory.mktemp("dash")
    v2 = tmp / "clinical-2.0.0.efpkg"
    build_package(BuildRequest(model=built.model, name="clinical", version="2.0.0", target="x86_64-avx2",
                               calibration=built.calibration, holdout=built.holdout, keys=built.keys, out=v2,
                               quantize="none", owner="clinical-ml", latency_runs=20))
    broker = Mosquitto(tmp / "mosquitto").start()
    receiver = Receiver()
    data = tmp / "server"
    cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")])
    for p in (built.package, v2):
        cli(["models", "publish", str(p), "--data", str(data), "--owner", "clinical-ml", "--oncall", receiver.url])
    operator = cli(["tokens", "create", "--data", str(data), "--role", "operator", "--name", "olivia"]).strip()
    viewer = cli(["tokens", "create", "--data", str(data), "--role", "viewer", "--name", "victor"]).strip()
    server = Server(data, free_port(), broker, operator, tmp / "server.log").start()
    fleet = Fleet(SimConfig(root=tmp / "devices", server_url=server.url, broker_url=broker.url,
                            operator_token=operator, root_pub=built.keys / "root.pub",
                            fleet_pub=data / "keys" / "fleet.pub", devices=6, first_package=built.package,
                            window_count=40, min_window_samples=10))
    try:
        fleet.provision()
        fleet.start()
        with np.load(built.calibration) as z:
            x, y = z["x"], z["y"]
        with np.load(built.holdout) as z:
            x, y = np.concatenate([x, z["x"]]), np.concatenate([y, z["y"]])
        shifted = SHIFTED
        std = x.std(axis=0)
        rng = np.random.default_rng(2)
        picked: dict[str, np.ndarray] = {}

        def rows_for(d: Any, n: int) -> np.ndarray:
            idx = rng.integers(0, len(x), n)
            picked[d.device_id] = idx
            rows = np.maximum(x[idx] + rng.normal(0, 0.02, (n, x.shape[1])) * std, 0).astype(np.float32)
            if d.tags["site"] == "north":
                rows[:, shifted] += 2.0 * std[shifted]
            return rows

        def labels_for(d: Any, n: int) -> np.ndarray:  # the south site's clinicians confirm diagnoses
            return y[picked[d.device_id]] if d.tags["site"] == "south" else np.full(n, -1)

        for _ in range(8):
            fleet.stream(rows_for, 100, labels_for=labels_for)
        fleet.flush_windows()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {operator}"}, timeout=30) as api:
            def drifted() -> bool:
                r = api.get("/api/v1/drift", params={"model": "clinical", "version": "1.0.0", "by": "site"}).json()
                return bool(r.get("cohorts", {}).get("north", {}).get("input_drift", {}).get("drifted"))

            assert fleet.wait_until(drifted, 90), "site north never showed drift"
            assert fleet.wait_until(lambda: len(api.get("/api/v1/alerts").json()) >= 1, 60)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield Dash(server, fleet, receiver, operator, viewer)
    finally:
        fleet.stop()
        server.stop()
        receiver.close()
        broker.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser: Any, dash: Dash) -> Iterator[Any]:
    """A fresh tab (own sessionStorage) that records console errors and every request's origin."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.requests = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("request", lambda r: pg.requests.append(r.url))
    try:
        yield pg
    finally:
        ctx.close()


def sign_in(page: Any, dash: Dash, token: str, route: str = "") -> None:
    page.goto(f"{dash.url}/ui/{route}")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_test_id("signed-in").wait_for()


def shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())
