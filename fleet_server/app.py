"""The FastAPI app, built by a factory from settings (nothing at import time). Errors map to status codes here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet_contracts.errors import ContractError

from . import devices, openapi, registry
from .auth import authenticate, require
from .bodies import body_object, boolean, known_fields, number, string, strings
from .errors import FleetError, RequestError, TooLargeError
from .settings import ServerSettings
from .store import Store

MAX_BODY = 16 * 1024 * 1024


def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> tuple[str, str]:
    """(token name, role) of the caller. Raises AuthError."""
    return authenticate(request.app.state.ctx.store, authorization)


def _role(needed: str) -> Callable[..., tuple[str, str]]:
    def dep(p: Annotated[tuple[str, str], Depends(principal)]) -> tuple[str, str]:
        require(p[1], needed)
        return p

    return dep


# Route dependencies: annotate a parameter with one of these to require that role (or higher).
Viewer = Annotated[tuple[str, str], Depends(_role("viewer"))]
Operator = Annotated[tuple[str, str], Depends(_role("operator"))]
Admin = Annotated[tuple[str, str], Depends(_role("admin"))]


# List routes are keyset-paged: ``?limit=`` rows per page (422 naming ``limit`` outside 1..MAX_LIMIT) and an
# exclusive cursor named for the list's direction (``after`` ascending, ``before`` newest-first).
DEFAULT_LIMIT, MAX_LIMIT = 1000, 10_000
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"rows per page (1..{MAX_LIMIT})")]


def page(request: Request, response: Response, rows: list[dict[str, Any]], limit: int, cursor: str,
         key: str) -> list[dict[str, Any]]:
    """The first ``limit`` of ``rows`` (read with ``limit + 1``). When there was one more, ``response`` gets an
    RFC 8288 ``Link: <URL>; rel="next"`` header (GitHub's convention): this request's path and query, so the same
    filters and limit, with ``cursor`` set to the last row's ``key``. No header on the last page."""
    if len(rows) <= limit:
        return rows
    rows = rows[:limit]
    url = request.url.include_query_params(limit=limit, **{cursor: rows[-1][key]})
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return rows


async def read_json(request: Request) -> Any:
    """The request body as JSON; RequestError (422) when it is not, TooLargeError (413) past ``MAX_BODY`` (a
    chunked body carries no Content-Length for the middleware to refuse: it is read no further than that)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise TooLargeError(f"body over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_no_constant)
    except _NotJSONNumberError as exc:
        raise RequestError(f"request body is not JSON: {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise RequestError("request body is not JSON") from None
    except RecursionError:  # a few kB of "[[[[..." is enough: no request body of this API nests that deep
        raise RequestError("request body nests too deeply to be one of this API's bodies") from None


class _NotJSONNumberError(ValueError):
    pass


def _no_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are Python's extensions, not JSON: no field of this API takes them."""
    raise _NotJSONNumberError(f"{name} is not a JSON number")


class Context:
    """What routes need: settings, store, and the pluggable parts (ingest, drift, alerts) once they are attached."""

    def __init__(self, settings: ServerSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.extensions: dict[str, Any] = {}
        self.metrics: list[Callable[[], str]] = []


def _mqtt_check(ctx: Context) -> dict[str, Any]:
    """The MQTT subscriber's health (``MqttIngest.health``), ``disabled`` when the server runs without a broker,
    ``down`` when ingest is not running (not attached yet, or stopped)."""
    if ctx.settings.broker == "none":
        return {"status": "disabled"}
    svc = ctx.extensions.get("ingest")
    checks = [src.health() for src in getattr(svc, "sources", []) if hasattr(src, "health")]
    return checks[0] if checks else {"status": "down", "error": "ingest is not running"}


def _store_check(ctx: Context) -> dict[str, Any]:
    """``down`` (with the error and since when) while ingest's commits fail, e.g. on a full disk: summaries
    then wait unacknowledged (MQTT) or are answered 503 (HTTP); ``ok`` otherwise."""
    writer = getattr(ctx.extensions.get("ingest"), "writer", None)
    since = getattr(writer, "failing_since", None)
    if since is None:
        return {"status": "ok"}
    return {"status": "down", "error": getattr(writer, "last_write_error", None),
            "down_since": datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")}


def validation_detail(errors: Any) -> str:
    """FastAPI's parameter errors as one sentence naming each parameter: ``query limit: Input should be less
    than or equal to 10000 (got '10001')``."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        where = " ".join(loc) or "request"
        got = f" (got {e['input']!r})" if loc[:1] != ["body"] and isinstance(e.get("input"), str | int | float) \
            else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts) or "invalid request"


def _source_metrics(ctx: Context) -> list[Callable[[], str]]:
    """The metrics of the ingest sources (the MQTT subscriber's ``edgefleet_mqtt_connected``), read per scrape:
    ingest is attached after the app is made."""
    svc = ctx.extensions.get("ingest")
    return [src.metrics for src in getattr(svc, "sources", []) if hasattr(src, "metrics")]


def with_app(app: FastAPI, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
    """Run a background service with the app: ``start`` at startup, ``stop`` at shutdown, each in a worker
    thread (they block: threads are started and joined), never on the event loop."""

    async def _start() -> None:
        await run_in_threadpool(start)

    async def _stop() -> None:
        await run_in_threadpool(stop)

    app.router.add_event_handler("startup", _start)
    app.router.add_event_handler("shutdown", _stop)


def create_app(settings: ServerSettings, store: Store | None = None) -> FastAPI:
    store = store or Store(settings.db_path)
    ctx = Context(settings, store)
    app = FastAPI(title="edgefleet fleet server", version="1")
    app.state.ctx = ctx
    openapi.install(app)

    @app.exception_handler(FleetError)
    async def _fleet_error(_: Request, exc: FleetError) -> JSONResponse:
        # a 401 names the scheme to authenticate with (RFC 9110 11.6.1)
        headers = {"WWW-Authenticate": 'Bearer realm="edgefleet"'} if exc.status == 401 else None
        return JSONResponse({"error": exc.reason, "detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(ContractError)
    async def _contract_error(_: Request, exc: ContractError) -> JSONResponse:
        return JSONResponse({"error": exc.reason, "detail": str(exc)}, status_code=422)

    # Every error answer has one shape, ``{"error": token, "detail": sentence}``: the parameters FastAPI checks
    # itself (a ``limit`` out of range, a ``bool`` that is not one) add ``errors`` (each ``loc``, ``msg``,
    # ``type``), and an unknown path or method is a 404 / 405 in the same shape, not Starlette's bare detail.
    @app.exception_handler(RequestValidationError)
    async def _invalid_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in jsonable_encoder(exc.errors())]
        return JSONResponse({"error": "invalid_request", "detail": validation_detail(exc.errors()),
                             "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail
        if exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            detail = (f"no route {request.url.path}" if exc.status_code == 404
                      else f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse({"error": reason, "detail": str(detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _limit(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"error": "too_large", "detail": f"body over {MAX_BODY} bytes"}, status_code=413)
        response: Response = await call_next(request)
        return response

    app.state.roles = {"viewer": Viewer, "operator": Operator, "admin": Admin}

    _json = read_json

    @app.get("/healthz")
    async def healthz(strict: bool = False) -> JSONResponse:
        """``{"status": "ok" | "degraded", "checks": {"http": {...}, "mqtt": {...}, "store": {...}}}``: which part
        is degraded (``mqtt`` ``down`` with the broker, its error and since when; ``disabled`` with ``--broker
        none``; ``store`` ``down`` while ingest cannot commit, e.g. a full disk).
        HTTP 200 while this process answers, degraded or not: the API, package downloads, HTTP ingest and the
        dashboard still work, and restarting the server would not bring an external broker back, so a liveness
        probe must not kill it. ``?strict=true`` answers 503 when degraded, for monitors that read only the
        status code."""
        checks = {"http": {"status": "ok"}, "mqtt": _mqtt_check(ctx), "store": _store_check(ctx)}
        degraded = any(c["status"] not in ("ok", "disabled") for c in checks.values())
        return JSONResponse({"status": "degraded" if degraded else "ok", "checks": checks},
                            status_code=503 if degraded and strict else 200)

    ctx.metrics.append(lambda: "".join(m() for m in _source_metrics(ctx)))

    # ---- devices -----------------------------------------------------------------------------------------
    @app.get("/api/v1/devices")
    async def list_devices(request: Request, response: Response, _: Viewer, tag: str | None = None,
                           limit: Limit = DEFAULT_LIMIT, after: str | None = None) -> Any:
        """Enrolled devices in device id order, ``limit`` per page; ``after`` is the last device id of the
        previous page (exclusive). ``tag=key=value`` keeps the devices with that tag, split at the first ``=``
        (``tag=site=`` asks for an empty site); a filter that is no tag by the contract
        (:mod:`edgefleet_contracts.tags`) is a 422 naming the problem, never every device. ``Link: <...>;
        rel="next"`` gives the next page while there is one."""
        t = devices.parse_tag(tag) if tag is not None else None
        rows = await run_in_threadpool(lambda: devices.list_devices(store, t, limit=limit + 1, after=after))
        return page(request, response, rows, limit, "after", "device_id")

    @app.get("/api/v1/devices/{device_id}")
    async def get_device(device_id: str, _: Viewer) -> Any:
        return await run_in_threadpool(devices.get, store, device_id)

    @app.post("/api/v1/devices")
    async def enroll_device(request: Request, _: Operator) -> Any:
        b = body_object(await _json(request), "{device_id, public_key (PEM or base64), tags?, replace?}")
        known_fields(b, ("device_id", "public_key", "tags", "replace"))
        device_id, key, tags = string(b, "device_id"), string(b, "public_key"), strings(b, "tags")
        replace = boolean(b, "replace")
        return await run_in_threadpool(lambda: devices.enroll(store, settings.fleet, device_id, key, tags,
                                                              replace=replace))

    @app.post("/api/v1/enrollment-tokens")
    async def enrollment_token(request: Request, _: Operator) -> Any:
        b = known_fields(body_object(await _json(request) or {}, "{tags?, ttl_seconds?}"), ("tags", "ttl_seconds"))
        tags, ttl = strings(b, "tags"), number(b, "ttl_seconds", 86400, lo=1, hi=366 * 86400)
        return {"token": await run_in_threadpool(devices.create_enrollment_token, store, tags, ttl)}

    @app.post("/api/v1/enroll")
    async def self_enroll(request: Request) -> Any:
        b = body_object(await _json(request), "{token, device_id, public_key}")
        known_fields(b, ("token", "device_id", "public_key"))
        if not all(isinstance(b.get(k), str) for k in ("token", "device_id", "public_key")):
            raise RequestError("body must be {token, device_id, public_key}, each a string")
        return await run_in_threadpool(devices.self_enroll, store, settings.fleet, b["token"], b["device_id"],
                                       b["public_key"])

    @app.put("/api/v1/devices/{device_id}/tags")
    async def put_tags(device_id: str, request: Request, _: Operator) -> Any:
        b = await _json(request)
        if not isinstance(b, dict):
            raise RequestError("body must be an object of tag -> value")
        return await run_in_threadpool(devices.set_tags, store, device_id, b)

    @app.post("/api/v1/devices/{device_id}/revoke")
    async def revoke_device(device_id: str, request: Request, who: Operator) -> Any:
        """Revoke a lost, stolen or retired device (body ``{"reason": "..."}``): its messages are refused from the
        next ingest batch on (``device_revoked``), rollouts stop targeting it; it comes back only by an enroll
        with ``replace`` and a new key."""
        b = known_fields(body_object(await _json(request), "{reason}"), ("reason",))
        reason = string(b, "reason")
        return await run_in_threadpool(devices.revoke, store, device_id, reason, f"api:{who[0]}")

    # ---- models ------------------------------------------------------------------------------------------
    @app.get("/api/v1/models")
    async def list_models(request: Request, response: Response, _: Viewer, limit: Limit = DEFAULT_LIMIT,
                          after: str | None = None) -> Any:
        """Models (each as ``/api/v1/models/{name}``) in name order, ``limit`` per page; ``after`` is the last
        name of the previous page (exclusive). ``Link: <...>; rel="next"`` gives the next page while there is one."""
        rows = await run_in_threadpool(lambda: registry.list_models(store, limit=limit + 1, after=after))
        return page(request, response, rows, limit, "after", "name")

    @app.get("/api/v1/models/{name}")
    async def show_model(name: str, _: Viewer) -> Any:
        return await run_in_threadpool(registry.show, store, name)

    @app.get("/packages/{name}/{version}", operation_id="download_package")
    async def download(request: Request, name: str, version: str, range: Annotated[str | None, Header()] = None,
                       if_range: Annotated[str | None, Header()] = None) -> Response:
        """Package download for devices (packages are signed: integrity does not depend on this channel).
        Supports a single byte Range for resumable downloads over poor links, ``If-Range`` with the ETag (the
        package's sha256; anything else, a date included, sends the whole package) and HEAD."""
        row = await run_in_threadpool(registry.version_row, store, name, version)
        # The file in this data folder's packages/ by the name it was published under: the stored absolute path
        # is where the folder was then, and a restored backup (or a moved folder) lives elsewhere.
        path, length = settings.packages_dir / Path(row["path"]).name, int(row["length"])
        try:
            size = await run_in_threadpool(lambda: path.stat().st_size)
        except OSError:
            size = -1
        if size != length:  # lost or changed on disk: say so, instead of failing half-way through a response
            logging.getLogger("edgefleet.server").error("package %s %s: %s is missing or not %d bytes", name,
                                                        version, path, length)
            return JSONResponse({"error": "package_unavailable", "detail": f"{name} {version} is published but its "
                                 f"file is missing or damaged on the server ({path.name}); the operator must "
                                 "publish it again"}, status_code=503, headers={"Retry-After": "300"})
        if if_range is not None and if_range.strip() != f'"{row["sha256"]}"':
            range = None  # the client's partial copy is of other bytes: it gets the whole package (RFC 9110 13.1.5)
        try:
            span = registry.parse_range(range, length)
        except RequestError as exc:
            return JSONResponse({"error": "range", "detail": str(exc)}, status_code=416,
                                headers={"Content-Range": f"bytes */{length}"})
        start, end = span if span else (0, length - 1)

        def body() -> Any:
            with open(path, "rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left:
                    chunk = fh.read(min(65536, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk

        headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1), "ETag": f'"{row["sha256"]}"'}
        if span:
            headers["Content-Range"] = f"bytes {start}-{end}/{length}"
        if request.method == "HEAD":
            return Response(status_code=206 if span else 200, headers=headers, media_type="application/octet-stream")
        return StreamingResponse(body(), status_code=206 if span else 200, headers=headers,
                                 media_type="application/octet-stream")

    app.add_api_route("/packages/{name}/{version}", download, methods=["HEAD"], operation_id="package_headers")

    @app.get("/metrics")
    def metrics() -> Response:  # a plain function: the drift and alert gauges read SQLite (thread pool)
        parts = [m() for m in ctx.metrics]
        return Response("".join(parts), media_type="text/plain; version=0.0.4")

    return app
