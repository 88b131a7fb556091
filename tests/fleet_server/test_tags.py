"""Tag filters on the server follow the tag contract (``edgefleet_contracts.tags``): ``GET /api/v1/devices?tag=``
and the dashboard's ``/api/v1/signals?tag=`` split at the first '=', take an empty value as a value, and answer
a filter that is no tag (a control character, edge whitespace, an over-long key or value) with a 422 naming the
problem instead of quietly matching nothing. Real SQLite, the real app from its factory, real device windows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.model import load_model
from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server import devices
from fleet_server.app import create_app
from fleet_server.auth import create_token
from fleet_server.dashboard import attach_dashboard
from fleet_server.registry import publish
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.conftest import extract
from tests.fleet_server.test_health import TARGET, DriftFleet


@dataclass
class Server:
    client: TestClient
    store: Store
    settings: ServerSettings
    viewer: dict[str, str]

    def enroll(self, device_id: str, tags: dict[str, str]) -> None:
        devices.enroll(self.store, self.settings.fleet, device_id, public_b64(generate_key().public_key()), tags)

    def get(self, path: str, **params: str) -> Any:
        return self.client.get(path, params=params, headers=self.viewer)


@pytest.fixture
def server(built: Any, tmp_path: Path) -> Iterator[Server]:
    """``clinical 1.0.0`` published, no devices; the app with the dashboard's routes."""
    settings = ServerSettings(data_dir=tmp_path / "server", broker="none")
    store = Store(settings.db_path)
    publish(store, settings.packages_dir, built.keys / "root.pub", built.package, owner="ml",
            oncall="http://127.0.0.1:9/x")
    app = create_app(settings, store)
    attach_dashboard(app, app.state.ctx)
    viewer = {"Authorization": f"Bearer {create_token(store, 'viewer')}"}
    try:
        with TestClient(app) as client:
            yield Server(client, store, settings, viewer)
    finally:
        store.close()


NOT_TAGS = [
    ("si\x01te=north", "U+0001 in its key"),
    ("site=nor\nth", "U+000A in its value"),
    ("site =north", "whitespace at the start or end of its key"),
    ("site=north ", "whitespace at the start or end of its value"),
    ("k" * 65 + "=v", "65-character key"),
    ("site=" + "v" * 129, "129-character value"),
]


# ---- GET /api/v1/devices?tag= ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("tag", "problem"), NOT_TAGS)
def test_a_device_filter_that_is_no_tag_is_a_422_naming_the_problem(server: Server, tag: str, problem: str) -> None:
    server.enroll("dev-1", {"site": "north"})
    r = server.get("/api/v1/devices", tag=tag)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("tag filter ") and problem in detail and "e.g. tag=site=north" in detail


def test_an_empty_value_filters_the_devices_tagged_with_it(server: Server) -> None:
    server.enroll("blank", {"site": ""})
    server.enroll("north", {"site": "north"})
    server.enroll("untagged", {})
    r = server.get("/api/v1/devices", tag="site=")
    assert r.status_code == 200, r.text
    assert [d["device_id"] for d in r.json()] == ["blank"]  # not the untagged device, not every device


# ---- the dashboard: /api/v1/signals?tag= -----------------------------------------------------------------------
@pytest.mark.parametrize(("tag", "problem"), NOT_TAGS)
def test_a_dashboard_filter_that_is_no_tag_is_a_422_naming_the_problem(server: Server, tag: str,
                                                                       problem: str) -> None:
    r = server.get("/api/v1/signals", model="clinical", tag=tag)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("tag filter ") and problem in r.json()["detail"]


def test_the_dashboard_takes_an_empty_value_as_a_cohort(server: Server, built: Any, tmp_path: Path) -> None:
    """``site=`` used to be refused by the dashboard alone; now it is the cohort of devices whose site is ""."""
    model = load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), TARGET)
    with np.load(built.holdout) as z:
        fleet = DriftFleet(server.settings, server.store, model, z["x"].astype(np.float32), z["y"])
    for device_id, site in (("blank-1", ""), ("north-1", "north"), ("north-2", "north")):
        fleet.enroll(device_id, site=site)
        fleet.window(device_id, fleet.sample(50)[0])
    r = server.get("/api/v1/signals", model="clinical", tag="site=")
    assert r.status_code == 200, r.text
    assert (r.json()["tag"], r.json()["devices"], r.json()["summaries"]) == ("site=", 1, 1)
    north = server.get("/api/v1/signals", model="clinical", tag="site=north").json()
    assert (north["devices"], north["summaries"]) == (2, 2)
    assert server.get("/api/v1/signals", model="clinical", tag="").json()["devices"] == 3  # "" is no filter


# ---- what is stored follows the same rule: every stored tag can be filtered on -------------------------------
@pytest.mark.parametrize(("tags", "problem"), [
    ({"a=b": "c"}, "'=' in its key"),
    ({"site": "nor\nth"}, "U+000A in its value"),
    ({" site": "north"}, "whitespace at the start or end of its key"),
    ({"": "north"}, "empty key"),
])
def test_enrollment_refuses_a_tag_that_no_filter_could_reach(server: Server, tags: dict[str, str],
                                                               problem: str) -> None:
    op = {"Authorization": f"Bearer {create_token(server.store, 'operator')}"}
    body = {"device_id": "cam-1", "public_key": public_b64(generate_key().public_key()), "tags": tags}
    r = server.client.post("/api/v1/devices", json=body, headers=op)
    assert r.status_code == 422 and problem in r.json()["detail"], r.text
    assert server.store.one("SELECT 1 FROM devices WHERE device_id = 'cam-1'") is None
    r = server.client.post("/api/v1/enrollment-tokens", json={"tags": tags}, headers=op)
    assert r.status_code == 422 and problem in r.json()["detail"], r.text


def test_the_cli_tag_flags_follow_the_tag_contract(cli_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefleet_contracts.signing import save_public_key
    from fleet_server.cli import main as fleet_cli

    data = cli_data
    key = str(data.parent / "d1.pub")
    save_public_key(generate_key().public_key(), Path(key))
    capsys.readouterr()
    assert fleet_cli(["devices", "enroll", "--device-id", "d1", "--public-key", key, "--tag", "=north",
                      "--data", str(data)]) == 1
    assert "--tag '=north'" in capsys.readouterr().err
    assert fleet_cli(["devices", "enroll", "--device-id", "d1", "--public-key", key, "--tag", "formula=a=b",
                      "--data", str(data)]) == 0
    store = Store(ServerSettings(data_dir=data).db_path)
    try:
        assert devices.get(store, "d1")["tags"] == {"formula": "a=b"}
    finally:
        store.close()
