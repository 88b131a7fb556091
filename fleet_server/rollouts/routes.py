"""Rollout API (operator role to act, viewer to read) and `attach_rollouts(app, ctx)`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from ..app import DEFAULT_LIMIT, Limit, Operator, Viewer, page, read_json, with_app
from ..bodies import body_object, floats, integer, integers, number, string, strings
from ..errors import RequestError
from . import service
from .plan import parse_stages


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
        b = body_object(await _json(request), "{model, version, stages?, cohort?, bake_seconds?, max_per_minute?, "
                                              "window?, thresholds?, approve_stages?}")
        try:
            stages = parse_stages(string(b, "stages", "1,10,50,100"))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        model, version, cohort = string(b, "model"), string(b, "version"), strings(b, "cohort")
        bake, per_minute = number(b, "bake_seconds", 600, lo=0, hi=365 * 86400), integer(b, "max_per_minute", 0,
                                                                                        hi=10**9)
        window, thresholds = string(b, "window", ""), floats(b, "thresholds")
        approve = integers(b, "approve_stages", lo=1, hi=len(stages))

        def begin() -> Any:
            rid = service.start(store, model=model, version=version, cohort=cohort, stages=stages, bake_seconds=bake,
                                max_per_minute=per_minute, window=window, thresholds=thresholds,
                                approve_stages=approve, actor=who[0])
            return service.status(store, rid)

        return await run_in_threadpool(begin)

    @app.post("/api/v1/rollouts/{rid}/{action}")
    def act(rid: str, action: str, who: Operator) -> Any:
        return service.set_state(store, svc.signer, rid, action, who[0])

    @app.post("/api/v1/rollbacks")
    async def rollback(request: Request, who: Operator) -> Any:
        b = body_object(await _json(request), "{model, to (version), cohort?}")
        model, to, cohort = string(b, "model"), string(b, "to"), strings(b, "cohort")
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
