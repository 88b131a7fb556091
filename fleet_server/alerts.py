"""Alerts: rules over the health signals, one open alert per condition, delivered to the owner's on-call route.

**Rules** (defaults below, overridable per model in ``models.alert_rules`` JSON, validated by
:func:`parse_rules`): input drift, output drift, data quality (missing / NaN / out-of-range / schema-error
rates), accuracy drop (measured with ≥ ``min_labels`` labels, else the label-free estimate — only when it is
trustworthy — against the package's evaluation accuracy or its calibration map), error rate, p95 latency.

**Evaluation** (:func:`evaluate`) looks at the last ``window_s`` of summaries of every model version that
has any, fleet-wide and per cohort tag value (every tag key on the reporting devices, or ``cohort_tags``; a
cohort holding every device is the fleet and is skipped). A firing condition has the dedup key
``model|version|kind|scope``: while an alert with that key is open or acknowledged, later evaluations only
update its evidence (feature, statistic, p-values, window range, devices, counts) — one alert per persisting
condition.

**Resolution** (decided): automatic once the condition has been clear for ``resolve_after_s`` (default 1 h)
of consecutive evaluations — a version that stops reporting counts as clear — or by hand (API/CLI). Set
``resolve_after_s`` to null for hand-only resolution. After a resolution by hand the same condition does not
open a new alert for ``cooldown_s`` (default 1 h): the operator said it is dealt with. Acknowledging keeps an
alert open (deduplicated, still auto-resolving) and stops nothing but further attention.

**Delivery**: opening (and auto-resolving) an alert sets ``delivery_state = pending``; :func:`deliver_due`
(run by the background worker) POSTs the alert as JSON to ``models.oncall`` and records ``delivered``, or
retries with exponential backoff (``backoff_base_s · 2^(attempt-1)``, capped) up to ``webhook_retries``
retries, then ``failed`` with the last error. Every step is in the ``alerts`` row, visible through the API.
The body is the alert document as the API shows it (id, model, version, kind, state, severity, summary,
evidence, times, delivery) plus ``"type": "edgefleet.alert"``, ``"event": "opened" | "resolved" | "due"`` and
the model's ``owner``; the ``Idempotency-Key: edgefleet-alert-<id>-<event>`` header lets a receiver drop
repeats (a delivery whose answer was lost is sent again).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import httpx

from edgefleet_contracts.errors import ContractError

from .errors import ConflictError, NotFoundError, RequestError
from .health import (
    UNTAGGED,
    Aggregate,
    DataQualityPolicy,
    HealthPolicy,
    InputDriftPolicy,
    OutputDriftPolicy,
    Reference,
    TrustPolicy,
    assess,
    fmt_epoch,
    load_aggregate,
)
from .settings import ServerSettings
from .store import Store

log = logging.getLogger("edgefleet.alerts")

KINDS = ("input_drift", "output_drift", "data_quality", "accuracy_drop", "error_rate", "latency_p95",
         "retraining_due")
STATES = ("open", "acknowledged", "resolved")
ACTIVE = ("open", "acknowledged")
DELIVERY_STATES = ("pending", "delivered", "failed")
SEVERITY = {"input_drift": "warning", "output_drift": "warning", "data_quality": "warning",
            "accuracy_drop": "critical", "error_rate": "critical", "latency_p95": "warning", "retraining_due": "info"}
MAX_EVIDENCE_DEVICES = 50


@dataclass(frozen=True)
class AccuracyRule:
    max_drop: float = 0.05  # absolute, below the package's accuracy
    min_count: int = 200  # predictions before a label-free estimate is trusted
    min_labels: int = 100  # labels before the measured accuracy is used instead


@dataclass(frozen=True)
class ErrorRateRule:
    max_rate: float = 0.05  # failed or rejected requests / requests
    min_requests: int = 100


@dataclass(frozen=True)
class LatencyRule:
    max_p95_ms: float = 250.0
    min_count: int = 100


@dataclass(frozen=True)
class AlertRules:
    health: HealthPolicy = field(default_factory=HealthPolicy)
    accuracy_drop: AccuracyRule = field(default_factory=AccuracyRule)
    error_rate: ErrorRateRule = field(default_factory=ErrorRateRule)
    latency_p95: LatencyRule = field(default_factory=LatencyRule)
    enabled: dict[str, bool] = field(default_factory=lambda: {k: True for k in KINDS})
    window_s: float = 86400.0
    resolve_after_s: float | None = 3600.0
    cooldown_s: float = 3600.0
    cohort_tags: list[str] | None = None  # None: every tag key the reporting devices carry

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"window_s": self.window_s, "resolve_after_s": self.resolve_after_s,
                             "cooldown_s": self.cooldown_s, "cohort_tags": self.cohort_tags}
        for name, obj in _sections(self).items():
            d[name] = {"enabled": self.enabled.get(name, True), **{f.name: getattr(obj, f.name) for f in fields(obj)}}
        return d


def _sections(r: AlertRules) -> dict[str, Any]:
    return {"input_drift": r.health.input_drift, "output_drift": r.health.output_drift,
            "data_quality": r.health.data_quality, "trust": r.health.trust, "accuracy_drop": r.accuracy_drop,
            "error_rate": r.error_rate, "latency_p95": r.latency_p95}


def _override(obj: Any, doc: Any, where: str) -> Any:
    if not isinstance(doc, dict):
        raise RequestError(f"alert_rules.{where} must be an object")
    names = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for k, v in doc.items():
        if k not in names:
            raise RequestError(f"alert_rules.{where}.{k} is not a setting; settings: enabled, {', '.join(names)}")
        cur, optional = getattr(obj, k), "None" in str(names[k].type)
        if v is None:
            ok = optional
        elif isinstance(cur, str):
            ok = isinstance(v, str)
        elif isinstance(cur, int) and not isinstance(cur, bool) and "float" not in str(names[k].type):
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
        else:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        if not ok:
            raise RequestError(f"alert_rules.{where}.{k} = {v!r} has the wrong type (default {cur!r})")
        changes[k] = v
    return replace(obj, **changes)


def parse_rules(doc: Any) -> AlertRules:
    """Defaults overridden by a ``models.alert_rules`` document. Raises RequestError naming the bad key and
    listing the valid ones."""
    if doc is None or doc == {}:
        return AlertRules()
    if not isinstance(doc, dict):
        raise RequestError("alert_rules must be a JSON object")
    r = AlertRules()
    secs = _sections(r)
    enabled = dict(r.enabled)
    top: dict[str, Any] = {}
    for k, v in doc.items():
        if k in secs:
            v = dict(v) if isinstance(v, dict) else v
            if isinstance(v, dict) and "enabled" in v:
                if not isinstance(v["enabled"], bool):
                    raise RequestError(f"alert_rules.{k}.enabled must be true or false")
                enabled[k] = v.pop("enabled")
            secs[k] = _override(secs[k], v, k)
        elif k in ("window_s", "cooldown_s", "resolve_after_s"):
            if not ((isinstance(v, int | float) and not isinstance(v, bool) and v > 0)
                    or (v is None and k == "resolve_after_s")):
                raise RequestError(f"alert_rules.{k} must be a positive number of seconds"
                                   + (" or null (resolve by hand only)" if k == "resolve_after_s" else ""))
            top[k] = v
        elif k == "cohort_tags":
            if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
                raise RequestError("alert_rules.cohort_tags must be a list of tag names or null (every tag)")
            top[k] = v
        else:
            raise RequestError(f"alert_rules.{k} is not a rule; rules: {', '.join(secs)}, window_s, resolve_after_s, "
                               "cooldown_s, cohort_tags")
    secs["input_drift"].stat()  # an unknown or categorical statistic fails here, listing the choices
    health = HealthPolicy(secs["input_drift"], secs["output_drift"], secs["data_quality"], secs["trust"])
    return replace(r, health=health, accuracy_drop=secs["accuracy_drop"], error_rate=secs["error_rate"],
                   latency_p95=secs["latency_p95"], enabled=enabled, **top)


def rules_for(store: Store, model: str) -> AlertRules:
    """The effective rules of a model. Raises NotFoundError for an unknown model, RequestError for bad rules."""
    row = store.one("SELECT alert_rules FROM models WHERE name = ?", (model,))
    if row is None:
        known = [r["name"] for r in store.query("SELECT name FROM models ORDER BY name")]
        raise NotFoundError(f"unknown model {model!r}; known: {', '.join(known) or 'none'}")
    return parse_rules(json.loads(row["alert_rules"] or "{}"))


def set_rules(store: Store, model: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate and store a model's rule overrides (replacing earlier ones); return the effective rules."""
    rules = parse_rules(overrides)
    with store.write() as c:
        if c.execute("UPDATE models SET alert_rules = ? WHERE name = ?",
                     (json.dumps(overrides, sort_keys=True), model)).rowcount == 0:
            raise NotFoundError(f"unknown model {model!r}")
    return rules.to_dict()


# ---- conditions (pure) -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    kind: str
    scope: str
    summary: str
    evidence: dict[str, Any]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def conditions(model: str, version: str, scope: str, h: dict[str, Any], rules: AlertRules,
               context: dict[str, Any]) -> list[Condition]:
    """The alert conditions one scope's health (:func:`fleet_server.health.assess` + window/devices) meets."""
    on = rules.enabled
    where = f"{model} {version} ({scope})"
    out: list[Condition] = []
    if on.get("input_drift", True) and h["input_drift"]["drifted"]:
        feats = [f for f in h["input_drift"]["features"] if f["verdict"] == "drift"]
        w = feats[0]
        p_adj = "" if w["p_adjusted"] is None else f", p_adj={w['p_adjusted']:.2g}"
        out.append(Condition("input_drift", scope,
                             f"{where}: input drift on {len(feats)} feature(s); worst {w['feature']} "
                             f"({h['input_drift']['statistic']} {w['statistic']:.3f}{p_adj})",
                             {**context, "statistic": h["input_drift"]["statistic"],
                              "correction": h["input_drift"]["correction"], "alpha": h["input_drift"]["alpha"],
                              "features": feats[:10], "drifted_features": len(feats)}))
    od = h["output_drift"]
    if on.get("output_drift", True) and od["drifted"]:
        out.append(Condition("output_drift", scope,
                             f"{where}: output drift (class mix w={od['class_mix']['cohens_w']}, "
                             f"p_adj={od['class_mix']['p_adjusted']:.2g}; confidence KS={od['confidence']['ks']})",
                             {**context, **od}))
    dq = h["data_quality"]
    if on.get("data_quality", True) and dq["flagged"]:
        first = dq["issues"][0]
        out.append(Condition("data_quality", scope,
                             f"{where}: {len(dq['issues'])} data-quality issue(s); {first['signal']} "
                             f"{_pct(first['rate'])} on {first['feature'] or 'requests'} (max {_pct(first['max'])})",
                             {**context, "issues": dq["issues"], "schema_errors": dq["schema_errors"],
                              "requests": dq["requests"]}))
    acc, ar = h["accuracy"], rules.accuracy_drop
    if on.get("accuracy_drop", True) and acc["reference"] is not None:
        measured = acc["measured"]
        value, how = None, ""
        if measured and measured["labels"] >= ar.min_labels:
            value, how = measured["accuracy"], f"measured on {measured['labels']} labels"
        elif acc["estimated"] is not None and acc["trustworthy"] and h["count"] >= ar.min_count:
            value, how = acc["estimated"], f"estimated without labels from {h['count']} predictions"
        if value is not None and acc["reference"] - value > ar.max_drop:
            out.append(Condition("accuracy_drop", scope,
                                 f"{where}: accuracy {_pct(value)} ({how}) vs {_pct(acc['reference'])} at packaging",
                                 {**context, "accuracy": value, "how": how, "reference": acc["reference"],
                                  "reference_source": acc["reference_source"], "max_drop": ar.max_drop,
                                  "measured": measured, "estimated": acc["estimated"],
                                  "empty_bin_share": acc["empty_bin_share"]}))
    ops, er = h["operations"], rules.error_rate
    if on.get("error_rate", True) and h["requests"] >= er.min_requests and ops["error_rate"] > er.max_rate:
        out.append(Condition("error_rate", scope,
                             f"{where}: error rate {_pct(ops['error_rate'])} (max {_pct(er.max_rate)})",
                             {**context, "error_rate": ops["error_rate"], "errors": ops["errors"],
                              "max_rate": er.max_rate}))
    lr, p95 = rules.latency_p95, ops["latency_ms"]["p95"]
    if on.get("latency_p95", True) and h["count"] >= lr.min_count and p95 is not None and p95 > lr.max_p95_ms:
        out.append(Condition("latency_p95", scope, f"{where}: p95 latency {p95:.1f} ms (max {lr.max_p95_ms:g} ms)",
                             {**context, "latency_ms": ops["latency_ms"], "max_p95_ms": lr.max_p95_ms}))
    return out


def scopes(agg: Aggregate, rules: AlertRules) -> list[tuple[str, list[str]]]:
    """Fleet-wide, then each cohort (tag=value) that is a proper, tagged subset of the reporting devices."""
    everyone = sorted(agg.devices)
    out = [("fleet", everyone)]
    for tag in rules.cohort_tags if rules.cohort_tags is not None else agg.tag_keys():
        for value, members in agg.cohorts(tag).items():
            if value != UNTAGGED and len(members) < len(everyone):
                out.append((f"{tag}={value}", members))
    return out


# ---- evaluation (store) ------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    opened: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    versions: int = 0
    scopes: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def dedup_key(model: str, version: str | None, kind: str, scope: str) -> str:
    return f"{model}|{version or '-'}|{kind}|{scope}"


def record_event(c: Any, at: float, kind: str, subject: str, detail: dict[str, Any]) -> None:
    c.execute("INSERT INTO events (at, kind, subject, detail) VALUES (?, ?, ?, ?)",
              (at, kind, subject, json.dumps(detail, sort_keys=True, default=str)))


def raise_alert(c: Any, model: str, version: str | None, kind: str, scope: str, summary: str,
                evidence: dict[str, Any], now: float, cooldown_s: float) -> tuple[str, int | None]:
    """Open an alert, or refresh the evidence of the open one with the same key. Inside a write transaction.

    Returns ("opened" | "updated" | "suppressed", alert id or None)."""
    key = dedup_key(model, version, kind, scope)
    row = c.execute("SELECT id, evidence FROM alerts WHERE dedup_key = ? AND state IN ('open', 'acknowledged')"
                    " ORDER BY id DESC LIMIT 1", (key,)).fetchone()
    if row is not None:
        old = json.loads(row["evidence"])
        ev = {**evidence, "first_seen": old.get("first_seen", now), "last_seen": now,
              "evaluations": int(old.get("evaluations", 1)) + 1}
        c.execute("UPDATE alerts SET evidence = ?, summary = ?, updated = ? WHERE id = ?",
                  (json.dumps(ev, sort_keys=True, default=str), summary, now, row["id"]))
        return "updated", int(row["id"])
    last = c.execute("SELECT evidence, updated FROM alerts WHERE dedup_key = ? AND state = 'resolved'"
                     " ORDER BY id DESC LIMIT 1", (key,)).fetchone()
    if last is not None and json.loads(last["evidence"]).get("resolved_by", "auto") != "auto" \
            and now - last["updated"] < cooldown_s:
        return "suppressed", None
    ev = {"scope": scope, **evidence, "first_seen": now, "last_seen": now, "evaluations": 1}
    cur = c.execute(
        "INSERT INTO alerts (model, version, kind, dedup_key, state, severity, summary, evidence, created, updated,"
        " delivery_state, delivery_attempts, next_attempt) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, 'pending', 0, ?)",
        (model, version, kind, key, SEVERITY[kind], summary, json.dumps(ev, sort_keys=True, default=str), now, now,
         now))
    alert_id = int(cur.lastrowid)
    record_event(c, now, "alert_opened", f"{model}/{version or '-'}", {"id": alert_id, "kind": kind, "scope": scope,
                                                                      "summary": summary})
    return "opened", alert_id


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
            c.execute("UPDATE alerts SET state = 'resolved', evidence = ?, updated = ?, delivery_state = 'pending',"
                      " delivery_attempts = 0, delivery_error = NULL, next_attempt = ? WHERE id = ?",
                      (json.dumps(ev, sort_keys=True), now, now, r["id"]))
            record_event(c, now, "alert_resolved", model, {"id": r["id"], "by": "auto",
                                                           "clear_for_s": round(now - since, 3)})
            result.resolved.append(int(r["id"]))


GROUPED = "grouped"


def group_conditions(found: list[tuple[str, Condition]]) -> list[tuple[str, Condition]]:
    """One page per (version, kind), not one per scope: a shift in one site also shows in the fleet and in every
    cohort that shares devices with it, and paging for each would teach on-call to ignore the pager.

    The headline is the most specific scope (fewest devices; a tag cohort before the fleet), which is usually
    where the cause is; every affected scope is listed in the evidence (``scopes``). The dedup key uses the
    fixed scope ``grouped``, so a change of headline between evaluations refreshes the same alert.
    """
    by: dict[tuple[str, str], list[Condition]] = {}
    for version, cond in found:
        by.setdefault((version, cond.kind), []).append(cond)
    out: list[tuple[str, Condition]] = []
    for (version, kind), conds in by.items():
        conds.sort(key=lambda c: (c.scope == "fleet", c.evidence.get("device_count", 0) or 0, c.scope))
        head = conds[0]
        others = [c.scope for c in conds[1:]]
        evidence = {**head.evidence, "scope": head.scope,
                    "scopes": [{"scope": c.scope, "summary": c.summary, "devices": c.evidence.get("device_count")}
                               for c in conds]}
        summary = head.summary + (f" (also seen in: {', '.join(others)})" if others else "")
        out.append((version, Condition(kind, GROUPED, summary, evidence)))
    return out


def evaluate(store: Store, now: float | None = None) -> Evaluation:
    """Run every model's rules over its recent summaries; open, refresh and auto-resolve alerts."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    result = Evaluation()
    for m in store.query("SELECT name FROM models ORDER BY name"):
        model = m["name"]
        try:
            rules = rules_for(store, model)
        except RequestError as exc:
            result.errors.append(f"{model}: {exc}")
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
            for scope, members in scopes(agg, rules):
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
                                             now, rules.cooldown_s)
                raised.add(dedup_key(model, version, cond.kind, cond.scope))
                if what == "opened" and alert_id is not None:
                    result.opened.append(alert_id)
                elif what == "updated" and alert_id is not None:
                    result.updated.append(alert_id)
            _clear(c, model, raised, now, rules, result)
    result.seconds = time.perf_counter() - t0
    return result


# ---- reading and changing alerts ---------------------------------------------------------------------------

def alert_doc(r: Any) -> dict[str, Any]:
    return {"id": r["id"], "model": r["model"], "version": r["version"], "kind": r["kind"], "state": r["state"],
            "severity": r["severity"], "summary": r["summary"], "evidence": json.loads(r["evidence"]),
            "created": fmt_epoch(r["created"]), "updated": fmt_epoch(r["updated"]),
            "acknowledged_by": r["acknowledged_by"],
            "delivery": {"state": r["delivery_state"], "attempts": r["delivery_attempts"],
                         "last_error": r["delivery_error"],
                         "next_attempt": fmt_epoch(r["next_attempt"]) if r["next_attempt"] else None}}


def list_alerts(store: Store, state: str | None = None, model: str | None = None, limit: int = 200
                ) -> list[dict[str, Any]]:
    """Newest first. ``state``: open | acknowledged | resolved | active (open or acknowledged) | None (all).

    Raises RequestError for an unknown state."""
    sql = "SELECT * FROM alerts WHERE 1 = 1"
    args: list[Any] = []
    if state is not None:
        if state == "active":
            sql += " AND state IN ('open', 'acknowledged')"
        elif state in STATES:
            sql += " AND state = ?"
            args.append(state)
        else:
            raise RequestError(f"unknown alert state {state!r}; states: {', '.join(STATES)}, active")
    if model:
        sql += " AND model = ?"
        args.append(model)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(max(1, min(limit, 5000)))
    return [alert_doc(r) for r in store.query(sql, tuple(args))]


def get_alert(store: Store, alert_id: int) -> dict[str, Any]:
    r = store.one("SELECT * FROM alerts WHERE id = ?", (alert_id,))
    if r is None:
        raise NotFoundError(f"no alert {alert_id}")
    return alert_doc(r)


def acknowledge(store: Store, alert_id: int, by: str, now: float | None = None) -> dict[str, Any]:
    """Raises NotFoundError, or ConflictError when the alert is already resolved."""
    now = time.time() if now is None else now
    with store.write() as c:
        r = c.execute("SELECT state, model, version FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if r is None:
            raise NotFoundError(f"no alert {alert_id}")
        if r["state"] == "resolved":
            raise ConflictError(f"alert {alert_id} is already resolved")
        c.execute("UPDATE alerts SET state = 'acknowledged', acknowledged_by = ?, updated = ? WHERE id = ?",
                  (by, now, alert_id))
        record_event(c, now, "alert_acknowledged", f"{r['model']}/{r['version'] or '-'}", {"id": alert_id, "by": by})
    return get_alert(store, alert_id)


def resolve(store: Store, alert_id: int, by: str, now: float | None = None) -> dict[str, Any]:
    """Resolve by hand (idempotent: resolving a resolved alert returns it unchanged). Raises NotFoundError."""
    now = time.time() if now is None else now
    with store.write() as c:
        r = c.execute("SELECT state, model, version, evidence FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if r is None:
            raise NotFoundError(f"no alert {alert_id}")
        if r["state"] != "resolved":
            ev = {**json.loads(r["evidence"]), "resolved_by": by, "resolved_at": now}
            c.execute("UPDATE alerts SET state = 'resolved', evidence = ?, updated = ? WHERE id = ?",
                      (json.dumps(ev, sort_keys=True), now, alert_id))
            record_event(c, now, "alert_resolved", f"{r['model']}/{r['version'] or '-'}", {"id": alert_id, "by": by})
    return get_alert(store, alert_id)


# ---- delivery ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeliveryConfig:
    timeout_s: float = 5.0
    retries: int = 5  # after the first attempt
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    batch: int = 50

    @classmethod
    def from_settings(cls, s: ServerSettings, **kw: Any) -> DeliveryConfig:
        return cls(timeout_s=s.webhook_timeout_seconds, retries=s.webhook_retries, **kw)


def payload(alert: dict[str, Any], owner: str | None) -> dict[str, Any]:
    event = "resolved" if alert["state"] == "resolved" else ("opened" if alert["kind"] != "retraining_due" else "due")
    return {"type": "edgefleet.alert", "event": event, "owner": owner, **alert}


def deliver_due(store: Store, cfg: DeliveryConfig, now: float | None = None,
                client: httpx.Client | None = None) -> dict[str, int]:
    """POST every pending alert whose next attempt is due to its model's on-call webhook. Returns counts by
    outcome (delivered, retry, failed). Network errors never raise: they are recorded on the alert."""
    now = time.time() if now is None else now
    rows = store.query("SELECT a.*, m.oncall, m.owner FROM alerts a LEFT JOIN models m ON m.name = a.model"
                       " WHERE a.delivery_state = 'pending' AND COALESCE(a.next_attempt, 0) <= ?"
                       " ORDER BY a.next_attempt, a.id LIMIT ?", (now, cfg.batch))
    counts = {"delivered": 0, "retry": 0, "failed": 0}
    if not rows:
        return counts
    own = client is None
    http = client or httpx.Client(timeout=cfg.timeout_s)
    try:
        for r in rows:
            doc = alert_doc(r)
            body = payload(doc, r["owner"])
            error = None
            if not r["oncall"]:
                error = f"model {r['model']} has no on-call route"
            else:
                try:
                    resp = http.post(r["oncall"], json=body, timeout=cfg.timeout_s,
                                     headers={"Idempotency-Key": f"edgefleet-alert-{r['id']}-{body['event']}"})
                    if not 200 <= resp.status_code < 300:
                        error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:300]
            attempts = r["delivery_attempts"] + 1
            done = time.time()
            # only if nobody re-queued the alert meanwhile (an auto-resolve restarts delivery with a new event)
            same = " AND state = ? AND delivery_state = 'pending' AND delivery_attempts = ?"
            guard = (r["state"], r["delivery_attempts"])
            with store.write() as c:
                if error is None:
                    c.execute("UPDATE alerts SET delivery_state = 'delivered', delivery_attempts = ?,"
                              " delivery_error = NULL, next_attempt = NULL WHERE id = ?" + same,
                              (attempts, r["id"], *guard))
                    counts["delivered"] += 1
                elif attempts > cfg.retries:
                    c.execute("UPDATE alerts SET delivery_state = 'failed', delivery_attempts = ?, delivery_error = ?,"
                              " next_attempt = NULL WHERE id = ?" + same, (attempts, error, r["id"], *guard))
                    record_event(c, done, "alert_delivery_failed", r["model"], {"id": r["id"], "attempts": attempts,
                                                                                "error": error})
                    counts["failed"] += 1
                else:
                    delay = min(cfg.backoff_base_s * 2 ** (attempts - 1), cfg.backoff_max_s)
                    c.execute("UPDATE alerts SET delivery_attempts = ?, delivery_error = ?, next_attempt = ?"
                              " WHERE id = ?" + same, (attempts, error, done + delay, r["id"], *guard))
                    counts["retry"] += 1
            if error is not None:
                log.warning("alert %s delivery attempt %d failed: %s", r["id"], attempts, error)
    finally:
        if own:
            http.close()
    return counts


def next_delivery_at(store: Store) -> float | None:
    r = store.one("SELECT MIN(next_attempt) AS t FROM alerts WHERE delivery_state = 'pending'")
    return None if r is None or r["t"] is None else float(r["t"])


def counts_by_state(store: Store) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"state": {s: 0 for s in STATES}, "delivery": {s: 0 for s in DELIVERY_STATES}}
    for r in store.query("SELECT state, delivery_state, COUNT(*) AS n FROM alerts GROUP BY state, delivery_state"):
        out["state"][r["state"]] = out["state"].get(r["state"], 0) + r["n"]
        out["delivery"][r["delivery_state"]] = out["delivery"].get(r["delivery_state"], 0) + r["n"]
    return out


__all__ = ["KINDS", "STATES", "AccuracyRule", "AlertRules", "Condition", "DataQualityPolicy", "DeliveryConfig",
           "ErrorRateRule", "Evaluation", "InputDriftPolicy", "LatencyRule", "OutputDriftPolicy", "TrustPolicy",
           "acknowledge", "conditions", "counts_by_state", "deliver_due", "evaluate", "get_alert", "list_alerts",
           "parse_rules", "raise_alert", "resolve", "rules_for", "set_rules"]
