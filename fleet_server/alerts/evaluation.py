"""Alert evaluation (store): every model's rules over its recent summaries; open, refresh and auto-resolve.

:func:`evaluate` looks at the last ``window_s`` of summaries of every model version that has any, fleet-wide
and per cohort tag value (every tag key on the reporting devices, or ``cohort_tags``; a cohort holding every
device is the fleet and is skipped). A firing condition has the dedup key ``model|version|kind|scope``, where
the conditions of one version and kind across scopes are first grouped into one with the scope ``grouped``
(:func:`~fleet_server.alerts.conditions.group_conditions`): while an alert with that key is open or
acknowledged, later evaluations only update its evidence (feature, statistic, p-values, window range, devices,
counts) — one alert per persisting condition. An alert whose condition is no longer met is resolved
automatically once it has been clear for ``resolve_after_s`` of consecutive evaluations (a version that stops
reporting counts as clear).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from edgefleet_contracts.errors import ContractError

from ..errors import NotFoundError, RequestError
from ..health import Reference, assess, fmt_epoch, load_aggregate
from ..store import Store
from .conditions import Condition, conditions, group_conditions, scopes
from .lifecycle import dedup_key, raise_alert, record_event
from .rules import AlertRules, rules_for

log = logging.getLogger("edgefleet.alerts")

MAX_EVIDENCE_DEVICES = 50


@dataclass
class Evaluation:
    opened: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    versions: int = 0
    scopes: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _clear(c: Any, model: str, raised: set[str], now: float, rules: AlertRules, result: Evaluation) -> None:
    rows = c.execute("SELECT id, dedup_key, evidence FROM alerts WHERE model = ? AND state IN ('open', 'acknowledged')"
                     " AND kind != 'retraining_due'", (model,)).fetchall()
    for r in rows:
        if r["dedup_key"] in raised:
            continue
        ev = json.loads(r["evidence"])
        since = ev.get("clear_since")
        if since is None:
            ev["clear_since"] = now
            c.execute("UPDATE alerts SET evidence = ? WHERE id = ?", (json.dumps(ev, sort_keys=True), r["id"]))
        elif rules.resolve_after_s is not None and now - since >= rules.resolve_after_s:
            ev.update(resolved_by="auto", resolved_at=now)
            # An alert whose opening page was never attempted (its settle time) pages no one now: a "resolved"
            # page about an alert on-call never saw opened says nothing (``not_sent``). Once an attempt started
            # (it may have reached on-call, its answer lost), the resolution is paged as usual.
            c.execute("UPDATE alerts SET state = 'resolved', evidence = ?, updated = ?, delivery_state = CASE "
                      "WHEN delivery_state = 'pending' AND delivery_attempts = 0 THEN 'not_sent' ELSE 'pending' END, "
                      "delivery_attempts = 0, delivery_error = NULL, next_attempt = ? WHERE id = ?",
                      (json.dumps(ev, sort_keys=True), now, now, r["id"]))
            record_event(c, now, "alert_resolved", model, {"id": r["id"], "by": "auto",
                                                           "clear_for_s": round(now - since, 3)})
            result.resolved.append(int(r["id"]))


def evaluate(store: Store, now: float | None = None) -> Evaluation:
    """Run every model's rules over its recent summaries; open, refresh and auto-resolve alerts."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    result = Evaluation()
    enrolled = {r["device_id"]: json.loads(r["tags"] or "{}")
                for r in store.query("SELECT device_id, tags FROM devices")}
    for m in store.query("SELECT name FROM models ORDER BY name"):
        model = m["name"]
        try:
            _evaluate_model(store, model, now, enrolled, result)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others' alerts
            log.exception("alert evaluation of model %s failed", model)
            result.errors.append(f"{model}: evaluation failed: {type(exc).__name__}: {exc}")
    result.seconds = time.perf_counter() - t0
    return result


def _evaluate_model(store: Store, model: str, now: float, enrolled: dict[str, dict[str, str]],
                    result: Evaluation) -> None:
    """One model's pass of :func:`evaluate`, its findings added to ``result``."""
    try:
        rules = rules_for(store, model)
    except RequestError as exc:
        result.errors.append(f"{model}: {exc} (its rules are ignored: the defaults apply)")
        rules = AlertRules()
    since, until = fmt_epoch(now - rules.window_s), fmt_epoch(now + 1)
    versions = [r["version"] for r in store.query(
        "SELECT DISTINCT version FROM summaries WHERE model = ? AND window_end > ? AND window_start < ?",
        (model, since, until))]
    found: list[tuple[str, Condition]] = []
    for version in versions:
        try:
            ref = Reference.load(store, model, version)
        except (NotFoundError, ContractError) as exc:  # unpublished, or a profile this server cannot read
            result.errors.append(f"{model} {version}: {exc}")
            continue
        agg = load_aggregate(store, ref, since, until)
        if not agg.devices:
            continue
        result.versions += 1
        for scope, members in scopes(agg, rules, enrolled):
            result.scopes += 1
            vec, span = agg.total(members)
            h = assess(ref, agg.layout, vec, rules.health)
            context = {"scope": scope, "window": {"start": span[0], "end": span[1]} if span else None,
                       "range": {"since": since, "until": until}, "device_count": len(members),
                       "devices": members[:MAX_EVIDENCE_DEVICES], "summaries": h["summaries"],
                       "count": h["count"], "requests": h["requests"]}
            found.extend((version, cond) for cond in conditions(model, version, scope, h, rules, context))
    found = group_conditions(found)
    with store.write() as c:
        raised: set[str] = set()
        for version, cond in found:
            what, alert_id = raise_alert(c, model, version, cond.kind, cond.scope, cond.summary, cond.evidence,
                                         now, rules.cooldown_s, rules.settle_s)
            raised.add(dedup_key(model, version, cond.kind, cond.scope))
            if what == "opened" and alert_id is not None:
                result.opened.append(alert_id)
            elif what == "updated" and alert_id is not None:
                result.updated.append(alert_id)
        _clear(c, model, raised, now, rules, result)
