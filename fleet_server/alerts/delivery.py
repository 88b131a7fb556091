"""Alert delivery to the owner's on-call route (``models.oncall``), with retries; run by the background worker.

Opening (and auto-resolving) an alert sets ``delivery_state = pending`` (auto-resolving one whose opening page
was never attempted sets ``not_sent``: nobody is paged about an alert they never saw open); :func:`deliver_due` POSTs
the alert as JSON to ``models.oncall`` and records ``delivered``, or retries with exponential backoff
(``backoff_base_s · 2^(attempt-1)``, capped) up to ``webhook_retries`` retries, then ``failed`` with the last
error. Every step is in the ``alerts`` row, visible through the API. The body is the alert document as the API
shows it (id, model, version, kind, state, severity, summary, evidence, times, delivery) plus
``"type": "edgefleet.alert"``, ``"event": "opened" | "resolved" | "due"`` and the model's ``owner``; the
``Idempotency-Key: edgefleet-alert-<id>-<event>`` header lets a receiver drop repeats (a delivery whose answer
was lost is sent again).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from ..settings import ServerSettings
from ..store import Store
from .lifecycle import alert_doc, record_event

log = logging.getLogger("edgefleet.alerts")


@dataclass(frozen=True)
class DeliveryConfig:
    timeout_s: float = 5.0
    retries: int = 5  # after the first attempt
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    batch: int = 50

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: ``backoff_base_s · 2^(attempts-1)``, capped."""
        return float(min(self.backoff_base_s * 2 ** (attempts - 1), self.backoff_max_s))

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
            attempts = r["delivery_attempts"] + 1
            # only if nobody re-queued the alert meanwhile (an auto-resolve restarts delivery with a new event)
            same = " AND state = ? AND delivery_state = 'pending' AND delivery_attempts = ?"
            # Claim the attempt before sending: the attempt and its retry time are stored first, so a store that
            # cannot be written (a full disk) stops the POST instead of letting every pass send it again (an
            # audit saw 26 identical pages a second while the write after the POST failed).
            retry_at = time.time() + cfg.backoff(attempts)
            with store.write() as c:
                claimed = c.execute("UPDATE alerts SET delivery_attempts = ?, next_attempt = ? WHERE id = ?" + same,
                                    (attempts, retry_at, r["id"], r["state"], r["delivery_attempts"])).rowcount
            if not claimed:
                continue  # changed since it was read: the next pass sees it as it is now
            guard = (r["state"], attempts)
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
            done = time.time()
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
                else:  # the backoff counts from the answer (a slow failure must not shorten it)
                    c.execute("UPDATE alerts SET delivery_error = ?, next_attempt = ? WHERE id = ?" + same,
                              (error, done + cfg.backoff(attempts), r["id"], *guard))
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

