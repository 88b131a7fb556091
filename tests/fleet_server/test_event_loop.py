"""No route reads or writes SQLite on the event loop's thread. One store call held up there (a busy disk, a
long checkpoint, a writer holding the lock for its busy timeout) would stall every request of every device and
operator; routes hand store work to the thread pool (``run_in_threadpool`` or a plain ``def`` route).

Every GET route the server has is called (so a new route is covered without editing this test), plus the
POST/PUT routes that touch the store, and each store connection request is attributed to its thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server.auth import create_token
from fleet_server.server import build
from fleet_server.settings import ServerSettings

PATH_VALUES = {"device_id": "dev-1", "name": "clinical", "version": "1.0.0", "rid": "r-unknown", "alert_id": "1",
               "key": "x"}
SKIP = {"/ui/static/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # no store work
WRITES = [
    ("POST", "/api/v1/devices", {"device_id": "dev-2", "public_key": public_b64(generate_key().public_key())}),
    ("PUT", "/api/v1/devices/dev-1/tags", {"site": "b"}),
    ("POST", "/api/v1/enrollment-tokens", {}),
    ("POST", "/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "stages": "100"}),
    ("POST", "/api/v1/summaries", []),
    ("POST", "/api/v1/devices/dev-1/revoke", {"reason": "test"}),
]


@pytest.fixture()
def traced(cli_data: Any) -> Iterator[tuple[TestClient, dict[str, str], set[int], list[tuple[int, str]]]]:
    data = cli_data
    app, ctx = build(ServerSettings(data_dir=data, broker="none"))
    admin = {"Authorization": f"Bearer {create_token(ctx.store, 'admin')}"}
    loop_threads: set[int] = set()
    calls: list[tuple[int, str]] = []
    current = {"path": ""}

    @app.middleware("http")
    async def _note_loop_thread(request: Any, call_next: Any) -> Any:  # runs on the event loop's thread
        loop_threads.add(threading.get_ident())
        current["path"] = request.url.path
        return await call_next(request)

    real = ctx.store.conn

    def conn() -> Any:
        calls.append((threading.get_ident(), current["path"]))
        return real()

    ctx.store.conn = conn  # type: ignore[method-assign]
    with TestClient(app) as client:
        calls.clear()  # start-up work (the lifespan's services) is not a request
        yield client, admin, loop_threads, calls


def _get_paths(client: TestClient) -> list[str]:
    out = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and "GET" in route.methods and route.path not in SKIP:
            out.append(route.path.format(**{k: PATH_VALUES[k] for k in route.param_convertors}))
    return out


def test_no_route_touches_the_store_on_the_event_loop_thread(traced: Any) -> None:
    client, admin, loop_threads, calls = traced
    paths = _get_paths(client)
    assert len(paths) >= 20 and "/api/v1/devices" in paths and "/packages/clinical/1.0.0" in paths, paths
    statuses = {}
    for path in paths:
        statuses[path] = client.get(path, headers=admin).status_code
    for method, path, body in WRITES:
        statuses[path] = client.request(method, path, headers=admin, json=body).status_code
    assert all(s < 500 for s in statuses.values()), statuses
    assert statuses["/api/v1/devices/dev-1"] == 200 and statuses["/api/v1/models/clinical"] == 200
    touched = {path for _, path in calls}
    assert len(touched) >= 20, sorted(touched)  # the routes did reach the store (else this test proves nothing)
    on_loop = sorted({path for ident, path in calls if ident in loop_threads})
    assert on_loop == [], f"store used on the event loop thread by: {on_loop}"
