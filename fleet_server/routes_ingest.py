"""HTTP ingest (for devices that cannot speak MQTT), the quarantine listing, and wiring ingest into the app.

``POST /api/v1/summaries`` takes one signed summary envelope or a list of up to 500; devices authenticate by
their signatures (no bearer token). It answers only after the transaction holding the message committed, with
``{"accepted": n, "duplicates": d, "rejected": [{"index", "reason", "detail"}]}`` (``index`` is null when the
whole body was refused). Status codes:

- **200** when at least one envelope was stored or already stored (duplicates): the body lists any
  envelopes rejected alongside. A client may drop everything it sent, except rejections with reason
  ``rate_limited``, which it may send again later; every other reason is permanent and the envelope is kept
  in quarantine for an operator.
- **422** when every envelope was rejected (same body), so that a naive client never mistakes "all
  refused" for success; **413** when the body is over the size limit; **429** (with ``Retry-After``) when every
  envelope was refused only because the device is over its rate.
- **503** when the store could not commit (nothing was stored; send again).

``GET /api/v1/quarantine?reason=&device_id=&limit=`` (viewer) lists quarantined messages, newest first.
"""

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, get_args

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .errors import RequestError
from .ingest import MAX_MESSAGE_BYTES, REASONS, IngestService, Outcome, Rejection

__all__ = ["attach_ingest", "register_ingest_routes", "status_for"]

HTTP_COMMIT_TIMEOUT = 30.0
PREVIEW_BYTES = 2048


def status_for(outcome: Outcome) -> int:
    """The HTTP status for an ingest outcome (see the module docstring)."""
    if outcome.error is not None:
        return 503
    if outcome.accepted or outcome.duplicates or not outcome.rejected:
        return 200
    reasons = {r.reason for r in outcome.rejected}
    if reasons == {"too_large"} and outcome.rejected[0].index is None:
        return 413
    if reasons == {"rate_limited"}:
        return 429
    return 422


def _rejection(r: Rejection) -> dict[str, Any]:
    return {"index": r.index, "reason": r.reason, "detail": r.detail}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, read no further than ``limit + 1`` bytes (the rest is not buffered)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


def register_ingest_routes(app: FastAPI, ctx: Any) -> None:
    """Add the ingest routes. ``ctx.extensions["ingest"]`` must hold the running IngestService."""
    viewer = get_args(app.state.roles["viewer"])[1]  # the Depends of the viewer role

    def service() -> IngestService:
        svc = ctx.extensions.get("ingest")
        if svc is None:
            raise RequestError("ingest is not attached to this server")
        return svc

    @app.post("/api/v1/summaries")
    async def post_summaries(request: Request) -> JSONResponse:
        svc = service()
        body = await _read_body(request, MAX_MESSAGE_BYTES)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()

        def settle(outcome: Outcome) -> None:
            if not future.done():
                future.set_result(outcome)

        def finished(outcome: Outcome) -> None:  # runs on the writer thread, after the commit
            loop.call_soon_threadsafe(settle, outcome)

        svc.submit("summary", body, topic_device=None, source="http", done=finished)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(future), HTTP_COMMIT_TIMEOUT)
        except TimeoutError:
            outcome = Outcome(error=f"not committed within {HTTP_COMMIT_TIMEOUT:g} s")
        status = status_for(outcome)
        if outcome.error is not None:
            return JSONResponse({"error": "unavailable", "detail": outcome.error}, status_code=status,
                                headers={"Retry-After": "5"})
        headers = {"Retry-After": "60"} if status == 429 else None
        return JSONResponse({"accepted": outcome.accepted, "duplicates": outcome.duplicates,
                             "rejected": [_rejection(r) for r in outcome.rejected]}, status_code=status,
                            headers=headers)

    @app.get("/api/v1/quarantine", dependencies=[viewer])
    async def quarantine(reason: str | None = None, device_id: str | None = None,
                         limit: int = Query(100, ge=1, le=1000),
                         before: int | None = Query(None, ge=0, le=2**63 - 1)) -> Any:
        if reason is not None and reason not in REASONS:
            raise RequestError(f"unknown reason {reason!r}; reasons: {', '.join(REASONS)}")
        where: list[str] = []
        args: list[Any] = []
        for col, val in (("reason", reason), ("device_id", device_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        sql = ("SELECT id, received, source, device_id, reason, detail, length(payload) AS size,"
               f" substr(payload, 1, {PREVIEW_BYTES}) AS preview FROM quarantine"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?")
        rows = await run_in_threadpool(ctx.store.query, sql, (*args, limit))
        return [{"id": r["id"], "received": r["received"], "source": r["source"], "device_id": r["device_id"],
                 "reason": r["reason"], "detail": r["detail"], "payload_bytes": r["size"] or 0,
                 "payload_preview": bytes(r["preview"] or b"").decode("utf-8", errors="replace")}
                for r in rows]


def attach_ingest(app: FastAPI, ctx: Any, *, validator_processes: int | None = None, start_timeout: float = 10.0,
                  stop_timeout: float = 15.0, **mqtt_options: Any) -> IngestService:
    """Create the ingest service (+ the MQTT subscriber unless ``settings.broker == "none"``), keep it in
    ``ctx.extensions["ingest"]``, add its routes and metrics, and start/stop it with the app's lifespan.

    ``validator_processes``: default 2 on a machine with 2 or more CPUs (validation is CPU-bound Python, so
    processes, not threads, use the second core), else 0 (validate in a thread). Shutdown pauses the
    subscriber, commits everything received (acknowledging it), then stops: nothing acknowledged is lost.
    Raises ConfigError when the broker URL cannot work.
    """
    if validator_processes is None:
        validator_processes = 2 if (os.cpu_count() or 1) >= 2 else 0
    svc = IngestService(ctx.settings, ctx.store, validator_processes=validator_processes)
    if ctx.settings.broker != "none":
        from .mqtt_ingest import mqtt_source

        mqtt_source(ctx.settings, svc, **mqtt_options)
    ctx.extensions["ingest"] = svc
    ctx.metrics.append(svc.metrics)
    register_ingest_routes(app, ctx)
    # HTTP comes up after this (uvicorn binds after the lifespan's startup), so the broker is waited for briefly:
    # with it down, /healthz answers "degraded" within ~2 s instead of refusing connections for the whole
    # timeout (a liveness probe would restart the server); the subscriber keeps trying in the background.
    _chain_lifespan(app, lambda: svc.start(start_timeout, source_wait=min(start_timeout, 2.0)),
                    lambda: svc.stop(stop_timeout))
    return svc


def _chain_lifespan(app: FastAPI, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
    """Wrap the app's lifespan: ``start`` before it, ``stop`` after it (in a worker thread: both block)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        await run_in_threadpool(start)
        try:
            async with inner(a) as state:
                yield state
        finally:
            await run_in_threadpool(stop)

    app.router.lifespan_context = lifespan
