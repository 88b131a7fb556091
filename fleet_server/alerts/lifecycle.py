"""The ``alerts`` table: an alert opened or refreshed by its dedup key (:func:`raise_alert`), acknowledged,
resolved by hand, and read back as the document the API shows (:func:`alert_doc`). Every change is also an
``events`` row (:func:`record_event`).

Resolution by hand is final for ``cooldown_s``: :func:`raise_alert` does not reopen the same condition until
then (an automatic resolution sets no such pause).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..errors import ConflictError, NotFoundError, RequestError
from ..health import fmt_epoch
from ..store import Store, record_event
from .rules import SEVERITY

STATES = ("open", "acknowledged", "resolved")
ACTIVE = ("open", "acknowledged")
# not_sent: resolved before its opening page went out, so no page was sent at all
DELIVERY_STATES = ("pending", "delivered", "failed", "not_sent")


def dedup_key(model: str, version: str | None, kind: str, scope: str) -> str:
    return f"{model}|{version or '-'}|{kind}|{scope}"


def raise_alert(c: Any, model: str, version: str | None, kind: str, scope: str, summary: str,
                evidence: dict[str, Any], now: float, cooldown_s: float, settle_s: float = 0.0
                ) -> tuple[str, int | None]:
    """Open an alert, or refresh the evidence of the open one with the same key. Inside a write transaction.
    A new alert's page is due ``settle_s`` after it opened (and carries the evidence current then).

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
         now + settle_s))
    alert_id = int(cur.lastrowid)
    record_event(c, now, "alert_opened", f"{model}/{version or '-'}", {"id": alert_id, "kind": kind, "scope": scope,
                                                                      "summary": summary})
    return "opened", alert_id

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

    Raises RequestError for an unknown state, NotFoundError for an unknown model."""
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
        if store.one("SELECT 1 FROM models WHERE name = ?", (model,)) is None:  # a typo is not "no alerts"
            known = [r["name"] for r in store.query("SELECT name FROM models ORDER BY name")]
            raise NotFoundError(f"unknown model {model!r}; known: {', '.join(known) or 'none'}")
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
    """Raises NotFoundError, or ConflictError when the alert is already resolved. Idempotent, as resolving is:
    acknowledging an acknowledged alert returns it unchanged (the first acknowledger stays on record, and no
    second event is logged)."""
    now = time.time() if now is None else now
    with store.write() as c:
        r = c.execute("SELECT state, model, version FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if r is None:
            raise NotFoundError(f"no alert {alert_id}")
        if r["state"] == "resolved":
            raise ConflictError(f"alert {alert_id} is already resolved")
        if r["state"] != "acknowledged":
            c.execute("UPDATE alerts SET state = 'acknowledged', acknowledged_by = ?, updated = ? WHERE id = ?",
                      (by, now, alert_id))
            record_event(c, now, "alert_acknowledged", f"{r['model']}/{r['version'] or '-'}",
                         {"id": alert_id, "by": by})
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

def counts_by_state(store: Store) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"state": {s: 0 for s in STATES}, "delivery": {s: 0 for s in DELIVERY_STATES}}
    for r in store.query("SELECT state, delivery_state, COUNT(*) AS n FROM alerts GROUP BY state, delivery_state"):
        out["state"][r["state"]] = out["state"].get(r["state"], 0) + r["n"]
        out["delivery"][r["delivery_state"]] = out["delivery"].get(r["delivery_state"], 0) + r["n"]
    return out
