"""Rollout API (operator role to act, viewer to read) and `attach_rollouts(app, ctx)`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..app import Operator, Viewer, read_json
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
    def list_rollouts(_: Viewer) -> Any:
        return service.list_rollouts(store)

    @app.get("/api/v1/rollouts/{rid}")
    def rollout_status(rid: str, _: Viewer) -> Any:
        return service.status(store, rid)

    @app.post("/api/v1/rollouts")
    async def start(request: Request, who: Operator) -> Any:
        b = await _json(request)
        if not isinstance(b, dict) or not isinstance(b.get("model"), str) or not isinstance(b.get("version"), str):
            raise RequestError("body needs model and version")
        try:
            stages = parse_stages(str(b.get("stages", "1,10,50,100")))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        kwargs = dict(model=b["model"], version=b["version"], cohort=dict(b.get("cohort") or {}), stages=stages,
                      bake_seconds=float(b.get("bake_seconds", 600)), max_per_minute=int(b.get("max_per_minute", 0)),
                      window=str(b.get("window", "")),
                      thresholds={k: float(v) for k, v in (b.get("thresholds") or {}).items()},
                      approve_stages=[int(s) for s in b.get("approve_stages") or []], actor=who[0])
        return await run_in_threadpool(lambda: service.status(store, service.start(store, **kwargs)))

    @app.post("/api/v1/rollouts/{rid}/{action}")
    def act(rid: str, action: str, who: Operator) -> Any:
        return service.set_state(store, svc.signer, rid, action, who[0])

    @app.post("/api/v1/rollbacks")
    async def rollback(request: Request, who: Operator) -> Any:
        b = await _json(request)
        if not isinstance(b, dict) or not isinstance(b.get("model"), str) or not isinstance(b.get("to"), str):
            raise RequestError("body needs model and to (version)")
        return await run_in_threadpool(lambda: service.status(store, service.rollback(
            store, svc.signer, b["model"], b["to"], dict(b.get("cohort") or {}), who[0])))

    def _start() -> None:
        if publish and ctx.settings.broker != "none":
            from .publisher import MqttPublisher

            svc.publisher = MqttPublisher(ctx.settings.broker_url())
        svc.start()

    def _stop() -> None:
        svc.stop()
        if svc.publisher is not None:
            svc.publisher.close()

    app.router.on_startup.append(_start)
    app.router.on_shutdown.append(_stop)
    return svc
