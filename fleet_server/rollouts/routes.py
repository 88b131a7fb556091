"""Rollout API (operator role to act, viewer to read) and `attach_rollouts(app, ctx)`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from ..app import DEFAULT_LIMIT, Limit, Operator, Viewer, page, read_json, with_app
from ..bodies import body_object, known_fields, string
from . import params, service

ROLLBACK_FIELDS = ("model", "to", "cohort")  # the fields of a POST /api/v1/rollbacks body


def attach_rollouts(app: FastAPI, ctx: Any, *, tick_seconds: float = 1.0, publish: bool = True) -> Any:
    svc = service.RolloutService(ctx.settings, ctx.store, tick_seconds=tick_seconds)
    ctx.extensions["rollouts"] = svc
    store = ctx.store

    _json = read_json

    # Routes that only read or write the store are plain functions (FastAPI runs them in its thread pool), and
    # those that await the body hand the store work to the pool: SQLite must not stall the event loop.
    @app.get("/api/v1/rollouts")
    def list_rollouts(request: Request, response: Response, _: Viewer, limit: Limit = DEFAULT_LIMIT,
                      before: str | None = None) -> Any:
        """Rollouts and rollbacks newest first, ``limit`` per page. The list runs backwards in time, so its
        cursor is ``before`` (as ``/api/v1/quarantine``): the id of the last, oldest rollout of the previous page
        (exclusive; 422 when it is not a rollout id). ``Link: <...>; rel="next"`` gives the next, older page
        while there is one."""
        return page(request, response, service.list_rollouts(store, limit=limit + 1, before=before), limit,
                    "before", "id")

    @app.get("/api/v1/rollouts/{rid}")
    def rollout_status(rid: str, _: Viewer) -> Any:
        return service.status(store, rid)

    @app.post("/api/v1/rollouts")
    async def start(request: Request, who: Operator) -> Any:
        """Start a rollout. The body's fields are :data:`params.START_FIELDS` (any other is a 422 naming it);
        every value is checked by ``service.start`` (the check the CLI shares), a 422 naming the field."""
        b = known_fields(body_object(await _json(request), "{model, version, stages?, cohort?, bake_seconds?, "
                                                           "max_per_minute?, window?, thresholds?, approve_stages?}"),
                         params.START_FIELDS)
        # stages: "1,10,50,100" or [1, 10, 50, 100]; service.start checks either, naming the field
        model, version, stages = string(b, "model"), string(b, "version"), b.get("stages", "1,10,50,100")

        def begin() -> Any:
            rid = service.start(store, model=model, version=version, cohort=b.get("cohort"), stages=stages,
                                bake_seconds=b.get("bake_seconds", 600), max_per_minute=b.get("max_per_minute", 0),
                                window=b.get("window", ""), thresholds=b.get("thresholds"),
                                approve_stages=b.get("approve_stages"), actor=who[0], names=params.BODY)
            return service.status(store, rid)

        return await run_in_threadpool(begin)

    @app.post("/api/v1/rollouts/{rid}/{action}")
    def act(rid: str, action: str, who: Operator) -> Any:
        """pause, resume, abort or approve (``service.ACTIONS``); another action is a 404 listing them."""
        return service.set_state(store, svc.signer, rid, action, who[0])

    @app.post("/api/v1/rollbacks")
    async def rollback(request: Request, who: Operator) -> Any:
        b = known_fields(body_object(await _json(request), "{model, to (version), cohort?}"), ROLLBACK_FIELDS)
        model, to, cohort = string(b, "model"), string(b, "to"), b.get("cohort")
        return await run_in_threadpool(lambda: service.status(store, service.rollback(
            store, svc.signer, model, to, cohort, who[0])))

    def _start() -> None:
        if publish and ctx.settings.broker != "none":
            from .publisher import MqttPublisher

            svc.publisher = MqttPublisher(ctx.settings.broker_url())
        svc.start()

    def _stop() -> None:
        svc.stop()
        if svc.publisher is not None:
            svc.publisher.close()

    with_app(app, _start, _stop)
    return svc
