"""The operator dashboard: a static single-page app served by the fleet server, and the read-only JSON it needs.

Everything the browser loads ships in ``fleet_server/dashboard/static`` (no CDN, no build step, no web fonts), so
it works on an air-gapped clinic network. The page asks for an API token (``fleet-server tokens create``), keeps it
in the tab's ``sessionStorage`` (gone when the tab closes) and sends it as a bearer token; the server enforces the
roles on every call, the page only hides what a role cannot do. Pages are served with a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script, no framing).

Routes (viewer unless marked):

- ``GET /`` redirects to ``/ui/``; ``GET /ui/`` the app; ``GET /ui/static/{file}`` its files (no auth: they hold
  no data).
- ``GET /api/v1/whoami``: the caller's token name and role.
- ``GET /api/v1/overview``: devices by tag and version, online/offline, active alerts and rollouts, models.
- ``GET /api/v1/signals?model=&version=&since=&until=&buckets=&tag=key=value``: the four signals over time.
- ``GET /api/v1/histogram?model=&version=&feature=&since=&until=&tag=``: reference vs current bins of a feature.
- ``GET /api/v1/devices/{id}/history`` and ``/windows``: reported-state changes and recent windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ..app import Viewer
from ..errors import NotFoundError
from . import data

__all__ = ["attach_dashboard"]

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def attach_dashboard(app: FastAPI, ctx: Any) -> None:
    store = ctx.store
    files = {p.name: p for p in STATIC.iterdir() if p.suffix in TYPES}  # the only files ever served

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(files["index.html"], media_type=TYPES[".html"], headers=HEADERS)

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = files.get(name)
        if path is None:
            raise NotFoundError(f"no dashboard file {name!r}")
        return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)

    @app.get("/api/v1/whoami")
    async def whoami(who: Viewer) -> Any:
        return {"name": who[0], "role": who[1]}

    @app.get("/api/v1/overview")
    async def overview(_: Viewer) -> Any:
        return await run_in_threadpool(data.overview, store, None, ctx.settings.offline_after_seconds)

    @app.get("/api/v1/signals")
    async def signals(_: Viewer, model: str, version: str | None = None, since: str | None = None,
                      until: str | None = None, buckets: int = Query(24, ge=1, le=data.MAX_BUCKETS),
                      tag: str | None = None) -> Any:
        return await run_in_threadpool(lambda: data.signals(store, model, version, since=since, until=until,
                                                            buckets=buckets, tag=tag))

    @app.get("/api/v1/histogram")
    async def histogram(_: Viewer, model: str, version: str, feature: str, since: str | None = None,
                        until: str | None = None, tag: str | None = None) -> Any:
        return await run_in_threadpool(lambda: data.histogram(store, model, version, feature, since=since,
                                                              until=until, tag=tag))

    @app.get("/api/v1/devices/{device_id}/history")
    async def device_history(device_id: str, _: Viewer, limit: int = Query(50, ge=1, le=500)) -> Any:
        return await run_in_threadpool(data.device_history, store, device_id, limit)

    @app.get("/api/v1/devices/{device_id}/windows")
    async def device_windows(device_id: str, _: Viewer, limit: int = Query(20, ge=1, le=500)) -> Any:
        return await run_in_threadpool(data.device_windows, store, device_id, limit)
