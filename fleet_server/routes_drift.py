"""Drift and alerts in the server: HTTP routes, the background service, its metrics, and the wiring.

Routes (bearer roles from ``app.state.roles``):

- ``GET /api/v1/drift?model=&version=&by=<tag>&since=&until=&devices=compact|full|none`` (viewer): the
  health report (:func:`fleet_server.health.report`) judged with the model's alert rules.
- ``GET /api/v1/alerts?state=open|acknowledged|resolved|active&model=&limit=`` and ``GET /api/v1/alerts/{id}``
  (viewer); ``POST /api/v1/alerts/{id}/ack`` and ``POST /api/v1/alerts/{id}/resolve`` (operator).
- ``GET /api/v1/models/{name}/alert-rules`` (viewer), ``PUT`` (operator, body = overrides; validated).

:class:`DriftService` runs, every ``settings.drift_interval_seconds``, one evaluation (alerts), the
retraining cadence check and hooks for drift alerts of ``retrain_on_drift`` models; a second thread delivers
pending alerts as soon as they are due (retries with backoff); a third runs retraining hooks one at a time
from a bounded queue, so a slow hook never delays alerts.
"""

import logging
import queue
import threading
import time
from typing import Annotated, Any, get_args

from fastapi import FastAPI, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from . import alerts, health, retraining
from .alerts import DeliveryConfig, Evaluation
from .app import read_json, with_app
from .errors import RequestError
from .retraining import HOOK_TIMEOUT_S, HookRun
from .settings import ServerSettings
from .store import Store

__all__ = ["DriftService", "attach_drift", "register_drift_routes"]

log = logging.getLogger("edgefleet.drift")
HOOK_QUEUE = 16


class DriftService:
    """Background evaluation, delivery and retraining hooks. ``start``/``stop`` are idempotent; ``run_once``
    does one evaluation pass synchronously (tests, ``fleet-server alerts evaluate``)."""

    def __init__(self, settings: ServerSettings, store: Store, *, delivery: DeliveryConfig | None = None,
                 hook_timeout_s: float = HOOK_TIMEOUT_S, delivery_poll_s: float = 1.0) -> None:
        self.settings = settings
        self.store = store
        self.interval = settings.drift_interval_seconds
        self.delivery = delivery or DeliveryConfig.from_settings(settings)
        self.hook_timeout_s = hook_timeout_s
        self.delivery_poll_s = delivery_poll_s
        self._stop = threading.Event()
        self._wake_delivery = threading.Event()
        self._hooks: queue.Queue[HookRun] = queue.Queue(maxsize=HOOK_QUEUE)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.evaluations = 0
        self.evaluation_failures = 0
        self.evaluation_errors = 0  # per-model problems of passes that ran (bad rules, unreadable profiles)
        self.delivery_failures = 0  # delivery passes that raised (a store that cannot be written)
        self._errors_seen: set[str] = set()
        self.last_evaluation_seconds = 0.0
        self.last = Evaluation()
        self.deliveries = {"delivered": 0, "retry": 0, "failed": 0}
        self.hooks_run = 0
        self.hooks_dropped = 0

    # ---- one pass ------------------------------------------------------------------------------------------
    def run_once(self, now: float | None = None) -> Evaluation:
        result = alerts.evaluate(self.store, now)
        hooks = retraining.check_due(self.store, now) + retraining.on_drift_alerts(self.store, result.opened)
        for h in hooks:
            try:
                self._hooks.put_nowait(h)
            except queue.Full:
                self.hooks_dropped += 1
                log.error("retraining hook queue full; dropped %s hook for %s", h.reason, h.model)
        with self._lock:
            self.evaluations += 1
            self.evaluation_errors += len(result.errors)
            self.last_evaluation_seconds = result.seconds
            self.last = result
            new = [e for e in result.errors if e not in self._errors_seen]
            self._errors_seen = set(result.errors)
        for e in new:  # once while it lasts, not every pass: the counter says it recurs
            log.error("drift evaluation: %s", e)
        self._wake_delivery.set()
        return result

    def deliver_once(self, now: float | None = None) -> dict[str, int]:
        counts = alerts.deliver_due(self.store, self.delivery, now)
        with self._lock:
            for k, v in counts.items():
                self.deliveries[k] += v
        return counts

    def run_pending_hooks(self) -> int:
        """Run queued hooks now (in this thread); returns how many ran."""
        n = 0
        while True:
            try:
                h = self._hooks.get_nowait()
            except queue.Empty:
                return n
            retraining.run_hook(self.store, h, self.hook_timeout_s)
            self.hooks_run += 1
            n += 1

    # ---- threads ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for name, target in (("drift-eval", self._eval_loop), ("alert-delivery", self._delivery_loop),
                             ("retrain-hooks", self._hook_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake_delivery.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def _eval_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 — a failed pass is logged and counted; the next one retries
                self.evaluation_failures += 1
                log.exception("drift evaluation failed")
            self._stop.wait(self.interval)

    def _delivery_loop(self) -> None:
        failures = 0  # passes failed in a row
        while not self._stop.is_set():
            try:
                self.deliver_once()
                failures = 0
            except Exception:  # noqa: BLE001 - logged (the first of a run with its traceback), counted, backed off
                failures += 1
                self.delivery_failures += 1
                if failures == 1:
                    log.exception("alert delivery pass failed; retrying with backoff")
                elif failures % 20 == 0:
                    log.error("alert delivery passes keep failing (%d in a row)", failures)
                self._wake_delivery.wait(min(60.0, 0.5 * 2 ** min(failures - 1, 7)))  # 0.5 s doubling to 60 s
                self._wake_delivery.clear()
                continue
            try:
                nxt = alerts.next_delivery_at(self.store)
            except Exception:  # noqa: BLE001 - an unreadable store: poll at the usual pace
                nxt = None
            wait = self.delivery_poll_s if nxt is None else min(max(nxt - time.time(), 0.01), self.delivery_poll_s)
            self._wake_delivery.wait(wait)
            self._wake_delivery.clear()

    def _hook_loop(self) -> None:
        while not self._stop.is_set():
            try:
                h = self._hooks.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                retraining.run_hook(self.store, h, self.hook_timeout_s)
                self.hooks_run += 1
            except Exception:  # noqa: BLE001
                log.exception("retraining hook for %s failed to run", h.model)

    # ---- metrics ------------------------------------------------------------------------------------------
    def metrics(self) -> str:
        by = alerts.counts_by_state(self.store)
        lines = [
            "# HELP edgefleet_drift_evaluations_total Drift and alert evaluation passes run.",
            "# TYPE edgefleet_drift_evaluations_total counter",
            f"edgefleet_drift_evaluations_total {self.evaluations}",
            "# HELP edgefleet_drift_evaluation_failures_total Evaluation passes that raised.",
            "# TYPE edgefleet_drift_evaluation_failures_total counter",
            f"edgefleet_drift_evaluation_failures_total {self.evaluation_failures}",
            "# HELP edgefleet_drift_evaluation_errors_total Problems of one model in a pass that went on with the "
            "others (bad alert rules, an unreadable reference profile, a failed model).",
            "# TYPE edgefleet_drift_evaluation_errors_total counter",
            f"edgefleet_drift_evaluation_errors_total {self.evaluation_errors}",
            "# HELP edgefleet_alert_delivery_pass_failures_total Alert delivery passes that raised (a store that "
            "cannot be written); backed off.",
            "# TYPE edgefleet_alert_delivery_pass_failures_total counter",
            f"edgefleet_alert_delivery_pass_failures_total {self.delivery_failures}",
            "# HELP edgefleet_drift_evaluation_seconds Duration of the last evaluation pass.",
            "# TYPE edgefleet_drift_evaluation_seconds gauge",
            f"edgefleet_drift_evaluation_seconds {self.last_evaluation_seconds:.6f}",
            "# HELP edgefleet_alerts Alerts by state.",
            "# TYPE edgefleet_alerts gauge",
            *(f'edgefleet_alerts{{state="{s}"}} {n}' for s, n in by["state"].items()),
            "# HELP edgefleet_alert_deliveries Alerts by delivery state.",
            "# TYPE edgefleet_alert_deliveries gauge",
            *(f'edgefleet_alert_deliveries{{state="{s}"}} {n}' for s, n in by["delivery"].items()),
            "# HELP edgefleet_alert_delivery_attempts_total Webhook attempts by outcome.",
            "# TYPE edgefleet_alert_delivery_attempts_total counter",
            *(f'edgefleet_alert_delivery_attempts_total{{outcome="{k}"}} {v}' for k, v in self.deliveries.items()),
            "# HELP edgefleet_retrain_hooks_total Retraining hooks run.",
            "# TYPE edgefleet_retrain_hooks_total counter",
            f"edgefleet_retrain_hooks_total {self.hooks_run}",
        ]
        return "\n".join(lines) + "\n"


AlertId = Annotated[int, Path(ge=1, le=2**63 - 1)]  # SQLite's integer range: larger ids are a 422, not a 500


def register_drift_routes(app: FastAPI, ctx: Any) -> None:
    """Add the drift, alert and alert-rule routes (they work with or without the service running)."""
    viewer = get_args(app.state.roles["viewer"])[1]  # the Depends of each role
    operator = get_args(app.state.roles["operator"])[1]
    store: Store = ctx.store

    def _drift(model: str, version: str | None, by: list[str], since: str | None, until: str | None,
               devices: str) -> dict[str, Any]:
        rules = alerts.rules_for(store, model)
        return health.report(store, model, version, since=since, until=until, by=by, policy=rules.health,
                             devices=devices)

    @app.get("/api/v1/drift", dependencies=[viewer])
    async def drift(model: str, version: str | None = None, by: Annotated[list[str] | None, Query()] = None,
                    since: str | None = None, until: str | None = None, devices: str = "compact") -> Any:
        """``by`` a tag key (cohorts per value); repeated (``by=site&by=hw``), every key's cohorts in one pass."""
        return await run_in_threadpool(_drift, model, version, by or [], since, until, devices)

    @app.get("/api/v1/alerts", dependencies=[viewer])
    async def list_alerts(state: str | None = None, model: str | None = None,
                          limit: int = Query(200, ge=1, le=5000)) -> Any:
        return await run_in_threadpool(alerts.list_alerts, store, state, model, limit)

    @app.get("/api/v1/alerts/{alert_id}", dependencies=[viewer])
    async def get_alert(alert_id: AlertId) -> Any:
        return await run_in_threadpool(alerts.get_alert, store, alert_id)

    @app.post("/api/v1/alerts/{alert_id}/ack")
    async def ack(alert_id: AlertId, who: tuple[str, str] = operator) -> Any:
        return await run_in_threadpool(alerts.acknowledge, store, alert_id, who[0])

    @app.post("/api/v1/alerts/{alert_id}/resolve")
    async def resolve(alert_id: AlertId, who: tuple[str, str] = operator) -> Any:
        return await run_in_threadpool(alerts.resolve, store, alert_id, who[0])

    @app.get("/api/v1/models/{name}/alert-rules", dependencies=[viewer])
    async def get_rules(name: str) -> Any:
        rules = await run_in_threadpool(alerts.rules_for, store, name)
        return rules.to_dict()

    @app.put("/api/v1/models/{name}/alert-rules", dependencies=[operator])
    async def put_rules(name: str, request: Request) -> Any:
        body = await read_json(request)  # bounded read: 413 past the body limit, 422 when not JSON
        if not isinstance(body, dict):
            raise RequestError("alert rules must be a JSON object")
        return await run_in_threadpool(alerts.set_rules, store, name, body)


def attach_drift(app: FastAPI, ctx: Any, **service_options: Any) -> DriftService:
    """Create the :class:`DriftService`, keep it in ``ctx.extensions["drift"]``, register the routes and the
    metrics, and start/stop it with the app (startup/shutdown handlers)."""
    svc = DriftService(ctx.settings, ctx.store, **service_options)
    ctx.extensions["drift"] = svc
    ctx.metrics.append(svc.metrics)
    register_drift_routes(app, ctx)
    with_app(app, svc.start, svc.stop)
    return svc
