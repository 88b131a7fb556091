"""Alerts: dedup, evidence, auto and manual resolution, webhook delivery to a real local receiver with retries,
roles on the API, per-model rules, the retraining cadence and hooks, and the background service."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_server import alerts, retraining
from fleet_server.alerts import DeliveryConfig
from fleet_server.app import create_app
from fleet_server.auth import create_token
from fleet_server.errors import RequestError
from fleet_server.routes_drift import attach_drift
from fleet_server.settings import ServerSettings
from tests.fleet_server import test_health
from tests.fleet_server.test_health import SHIFTED, DriftFleet
from tests.support import wait_until

# the same real-summary fleet as the health tests (fixtures re-exported, not redefined)
clinical = test_health.clinical
drift_fleet = test_health.drift_fleet

FAST = DeliveryConfig(timeout_s=2.0, retries=3, backoff_base_s=0.05, backoff_max_s=0.2)


class Receiver:
    """A real HTTP webhook receiver on 127.0.0.1:<free port>; answers with ``codes`` in turn, then 200."""

    def __init__(self, codes: list[int] | None = None, always: int | None = None) -> None:
        self.codes = list(codes or [])
        self.always = always
        self.requests: list[tuple[dict[str, str], Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((dict(self.headers), json.loads(body)))
                code = outer.always or (outer.codes.pop(0) if outer.codes else 200)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"nope" if code >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _fleet_only(f: DriftFleet, **rules: Any) -> None:
    """Judge the fleet scope only (no cohorts): one drift alert for the shifted south cohort's data."""
    alerts.set_rules(f.store, "clinical", {"cohort_tags": [], **rules})


def _route_to(f: DriftFleet, url: str) -> None:
    with f.store.write() as c:
        c.execute("UPDATE models SET oncall = ? WHERE name = 'clinical'", (url,))


def _active(f: DriftFleet, kind: str | None = None) -> list[dict[str, Any]]:
    return [a for a in alerts.list_alerts(f.store, "active") if kind is None or a["kind"] == kind]


def _deliver_until(f: DriftFleet, cfg: DeliveryConfig, done: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        alerts.deliver_due(f.store, cfg)
        time.sleep(0.01)
    assert done()


def test_a_persisting_condition_raises_one_alert_with_its_evidence(drift_fleet):
    f = drift_fleet
    f.cohorts()
    first = alerts.evaluate(f.store)
    second = alerts.evaluate(f.store, time.time() + 60)
    drift = {a["evidence"]["scope"]: a for a in _active(f, "input_drift")}
    # ONE page: the cohort is the headline; the fleet it is half of is listed as also affected; north is quiet.
    assert set(drift) == {"site=south"}
    a = drift["site=south"]
    assert [s["scope"] for s in a["evidence"]["scopes"]] == ["site=south", "fleet"]
    assert sorted(first.opened) == sorted(x["id"] for x in drift.values()) and second.opened == []
    assert a["id"] in second.updated
    ev = a["evidence"]
    shifted = f.model.profile.features[SHIFTED].name
    assert ev["evaluations"] == 2 and ev["statistic"] == "ks" and ev["correction"] == "holm"
    assert ev["features"][0]["feature"] == shifted and ev["features"][0]["p_adjusted"] < 1e-6
    assert ev["devices"] == ["south-0", "south-1", "south-2"] and ev["count"] == 900 and ev["summaries"] == 6
    assert ev["window"]["start"] < ev["window"]["end"] and ev["range"]["since"] < ev["window"]["start"]
    assert a["state"] == "open" and a["severity"] == "warning" and a["delivery"]["state"] == "pending"
    assert shifted in a["summary"] and "site=south" in a["summary"]
    opened = retraining.events(f.store, "alert_opened")
    assert len([e for e in opened if e["detail"]["kind"] == "input_drift"]) == 1


def test_alerts_resolve_automatically_once_clear_for_the_configured_period(drift_fleet):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f, resolve_after_s=600)
    now = time.time()
    [alert_id] = alerts.evaluate(f.store, now).opened
    rec = Receiver()
    try:
        _route_to(f, rec.url)
        assert alerts.deliver_due(f.store, FAST, now + 1)["delivered"] == 1  # on-call saw it open
    finally:
        rec.close()
    later = now + 86400 + 3600  # the windows have left the 24 h evaluation window: the condition is clear
    assert alerts.evaluate(f.store, later).resolved == []
    assert alerts.get_alert(f.store, alert_id)["evidence"]["clear_since"] == later
    assert alerts.evaluate(f.store, later + 599).resolved == []
    assert alerts.evaluate(f.store, later + 600).resolved == [alert_id]
    a = alerts.get_alert(f.store, alert_id)
    assert a["state"] == "resolved" and a["evidence"]["resolved_by"] == "auto"
    assert a["delivery"]["state"] == "pending"  # the on-call route hears about the resolution too
    alerts.set_rules(f.store, "clinical", {"resolve_after_s": None})  # hand-only resolution is a setting
    assert alerts.parse_rules({"resolve_after_s": None}).resolve_after_s is None


def test_an_alert_that_clears_before_its_first_page_pages_no_one(drift_fleet):
    """With a settle time longer than the auto-resolve delay, the first page on-call got was a "resolved" one
    about an alert they never saw open (found by a drift audit)."""
    f = drift_fleet
    f.cohorts()
    _fleet_only(f, resolve_after_s=600, settle_s=86400)
    rec = Receiver()
    try:
        _route_to(f, rec.url)
        now = time.time()
        [alert_id] = alerts.evaluate(f.store, now).opened
        later = now + 86400 + 3600
        alerts.evaluate(f.store, later)
        assert alerts.evaluate(f.store, later + 600).resolved == [alert_id]
        assert alerts.get_alert(f.store, alert_id)["delivery"]["state"] == "not_sent"
        assert alerts.deliver_due(f.store, FAST, later + 90000) == {"delivered": 0, "retry": 0, "failed": 0}
        assert rec.requests == []
    finally:
        rec.close()


def test_an_alert_whose_opening_page_was_attempted_still_pages_its_resolution(drift_fleet):
    """An attempt may have reached on-call with its answer lost: the resolution is paged (a not_sent here left
    on-call with an open alert never closed, found by a diff review)."""
    f = drift_fleet
    f.cohorts()
    _fleet_only(f, resolve_after_s=600)
    rec = Receiver(codes=[500])  # the first attempt fails: a retry is pending when the alert clears
    try:
        _route_to(f, rec.url)
        now = time.time()
        [alert_id] = alerts.evaluate(f.store, now).opened
        assert alerts.deliver_due(f.store, FAST, now + 1)["retry"] == 1
        later = now + 86400 + 3600
        alerts.evaluate(f.store, later)
        assert alerts.evaluate(f.store, later + 600).resolved == [alert_id]
        assert alerts.get_alert(f.store, alert_id)["delivery"]["state"] == "pending"
        assert alerts.deliver_due(f.store, FAST, later + 601)["delivered"] == 1
        assert [body["event"] for _, body in rec.requests] == ["opened", "resolved"]
    finally:
        rec.close()


def test_ack_and_resolve_need_the_operator_role_and_resolving_by_hand_mutes_for_the_cooldown(drift_fleet):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    [alert_id] = alerts.evaluate(f.store).opened
    app = create_app(f.settings, f.store)
    attach_drift(app, app.state.ctx)
    client = TestClient(app)
    viewer = {"Authorization": f"Bearer {create_token(f.store, 'viewer', 'vera')}"}
    operator = {"Authorization": f"Bearer {create_token(f.store, 'operator', 'otto')}"}
    r = client.post(f"/api/v1/alerts/{alert_id}/ack", headers=viewer)
    assert r.status_code == 403 and "needs 'operator'" in r.json()["detail"]
    assert client.post(f"/api/v1/alerts/{alert_id}/ack").status_code == 401
    r = client.post(f"/api/v1/alerts/{alert_id}/ack", headers=operator)
    assert r.status_code == 200 and r.json()["state"] == "acknowledged" and r.json()["acknowledged_by"] == "otto"
    other = {"Authorization": f"Bearer {create_token(f.store, 'operator', 'olga')}"}
    again = client.post(f"/api/v1/alerts/{alert_id}/ack", headers=other)  # idempotent: otto stays on record
    assert again.status_code == 200 and again.json()["acknowledged_by"] == "otto"
    assert len(retraining.events(f.store, "alert_acknowledged")) == 1
    listed = client.get("/api/v1/alerts", params={"state": "acknowledged"}, headers=viewer).json()
    assert [a["id"] for a in listed] == [alert_id]
    assert alerts.evaluate(f.store).opened == []  # acknowledged alerts still deduplicate
    r = client.post(f"/api/v1/alerts/{alert_id}/resolve", headers=operator)
    assert r.status_code == 200 and r.json()["state"] == "resolved" and r.json()["evidence"]["resolved_by"] == "otto"
    assert client.post(f"/api/v1/alerts/{alert_id}/ack", headers=operator).status_code == 409
    assert client.post("/api/v1/alerts/999/resolve", headers=operator).status_code == 404
    assert client.get("/api/v1/alerts", params={"state": "closed"}, headers=viewer).status_code == 422
    # the condition persists, but the operator resolved it: quiet for the cooldown, then a new alert
    assert alerts.evaluate(f.store, time.time() + 60).opened == []
    reopened = alerts.evaluate(f.store, time.time() + 3601).opened
    assert len(reopened) == 1 and reopened[0] != alert_id


def test_webhook_delivery_retries_with_backoff_until_the_receiver_accepts(drift_fleet):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    rec = Receiver(codes=[500, 500])
    try:
        _route_to(f, rec.url)
        [alert_id] = alerts.evaluate(f.store).opened
        assert alerts.deliver_due(f.store, FAST) == {"delivered": 0, "retry": 1, "failed": 0}
        a = alerts.get_alert(f.store, alert_id)["delivery"]
        assert (a["state"], a["attempts"]) == ("pending", 1) and a["last_error"].startswith("HTTP 500")
        assert alerts.deliver_due(f.store, FAST) == {"delivered": 0, "retry": 0, "failed": 0}  # backing off
        _deliver_until(f, FAST, lambda: alerts.get_alert(f.store, alert_id)["delivery"]["state"] == "delivered")
        a = alerts.get_alert(f.store, alert_id)["delivery"]
        assert (a["attempts"], a["last_error"]) == (3, None) and len(rec.requests) == 3
        headers, body = rec.requests[-1]
        assert body["type"] == "edgefleet.alert" and body["event"] == "opened" and body["id"] == alert_id
        assert body["kind"] == "input_drift" and body["owner"] == "clinical-ml" and body["evidence"]["features"]
        assert headers["Idempotency-Key"] == f"edgefleet-alert-{alert_id}-opened"
    finally:
        rec.close()


def test_delivery_failure_is_visible_after_the_retries_are_exhausted(drift_fleet):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    rec = Receiver(always=503)
    try:
        _route_to(f, rec.url)
        [alert_id] = alerts.evaluate(f.store).opened
        cfg = DeliveryConfig(timeout_s=2.0, retries=2, backoff_base_s=0.02)
        _deliver_until(f, cfg, lambda: alerts.get_alert(f.store, alert_id)["delivery"]["state"] == "failed")
        assert len(rec.requests) == 3
    finally:
        rec.close()
    app = create_app(f.settings, f.store)
    attach_drift(app, app.state.ctx)
    viewer = {"Authorization": f"Bearer {create_token(f.store, 'viewer')}"}
    d = TestClient(app).get(f"/api/v1/alerts/{alert_id}", headers=viewer).json()["delivery"]
    assert d["state"] == "failed" and d["attempts"] == 3 and d["last_error"].startswith("HTTP 503")
    assert retraining.events(f.store, "alert_delivery_failed")[0]["detail"]["id"] == alert_id
    # an unreachable route fails the same way, with the connection error recorded
    _route_to(f, "http://127.0.0.1:9/closed")
    with f.store.write() as c:
        c.execute("UPDATE alerts SET delivery_state = 'pending', delivery_attempts = 0, next_attempt = 0")
    alerts.deliver_due(f.store, DeliveryConfig(timeout_s=1.0, retries=0))
    d = alerts.get_alert(f.store, alert_id)["delivery"]
    assert d["state"] == "failed" and "ConnectError" in d["last_error"]


def test_rules_are_overridable_per_model_and_validated(drift_fleet):
    f = drift_fleet
    f.enroll("d")
    x, y = f.sample(400)
    f.window("d", x, labels=1 - y, latency_ms=2.0, rejects=[("inference", None)] * 40)  # wrong labels, errors
    alerts.evaluate(f.store)
    kinds = {a["kind"]: a for a in _active(f)}
    assert set(kinds) == {"accuracy_drop", "error_rate"}
    assert kinds["accuracy_drop"]["severity"] == "critical" and kinds["accuracy_drop"]["evidence"]["accuracy"] < 0.1
    assert "measured on 400 labels" in kinds["accuracy_drop"]["summary"]
    effective = alerts.set_rules(f.store, "clinical", {"latency_p95": {"max_p95_ms": 1.0},
                                                       "error_rate": {"enabled": False}})
    assert effective["latency_p95"]["max_p95_ms"] == 1.0 and effective["error_rate"]["enabled"] is False
    alerts.evaluate(f.store)
    assert {a["kind"] for a in _active(f)} >= {"accuracy_drop", "latency_p95"}
    with pytest.raises(RequestError, match="alert_rules.latency_p95.p95 is not a setting; settings: enabled, "
                                           "max_p95_ms, min_count"):
        alerts.set_rules(f.store, "clinical", {"latency_p95": {"p95": 1}})
    with pytest.raises(RequestError, match="rules: input_drift, output_drift"):
        alerts.parse_rules({"drift": {}})
    with pytest.raises(RequestError, match="choices: ks"):
        alerts.parse_rules({"input_drift": {"statistic": "kolmogorov"}})
    with pytest.raises(RequestError, match="wrong type"):
        alerts.parse_rules({"input_drift": {"alpha": "0.01"}})
    app = create_app(f.settings, f.store)
    attach_drift(app, app.state.ctx)
    client = TestClient(app)
    viewer = {"Authorization": f"Bearer {create_token(f.store, 'viewer')}"}
    operator = {"Authorization": f"Bearer {create_token(f.store, 'operator')}"}
    assert client.put("/api/v1/models/clinical/alert-rules", json={}, headers=viewer).status_code == 403
    r = client.put("/api/v1/models/clinical/alert-rules", json={"input_drift": {"alpha": 0.001}}, headers=operator)
    assert r.status_code == 200 and r.json()["input_drift"]["alpha"] == 0.001
    got = client.get("/api/v1/models/clinical/alert-rules", headers=viewer).json()
    assert got["input_drift"]["alpha"] == 0.001 and got["latency_p95"]["max_p95_ms"] == 250.0  # replaced


@pytest.mark.parametrize(("body", "says"), [
    ('{"window_s": 1e11}', "alert_rules.window_s must be a number of seconds over 0 and at most 366 days"),
    ('{"cooldown_s": 1e400}', "alert_rules.cooldown_s must be a number of seconds over 0 and at most 366 days"),
    ('{"resolve_after_s": 0}', "alert_rules.resolve_after_s must be a number of seconds over 0"),
    ('{"window_s": Infinity}', "request body is not JSON"),
    ('{"latency_p95": {"max_p95_ms": -1}}', "alert_rules.latency_p95.max_p95_ms must be a finite number, 0 or more"),
    ('{"latency_p95": {"max_p95_ms": 1e400}}', "alert_rules.latency_p95.max_p95_ms = inf has the wrong type"),
    ('{"error_rate": {"min_requests": -3}}', "alert_rules.error_rate.min_requests must be a whole number, 0 or more"),
    # values of the right type that mean nothing (the correction one ended every alert of the model)
    ('{"input_drift": {"correction": "fdr"}}',
     "alert_rules.input_drift.correction 'fdr' is not a correction; corrections: holm, bonferroni"),
    ('{"input_drift": {"alpha": 5}}', "alert_rules.input_drift.alpha is a probability over 0 and under 1"),
    ('{"output_drift": {"alpha": 0}}', "alert_rules.output_drift.alpha is a probability over 0 and under 1"),
    ('{"data_quality": {"max_missing_rate": 7}}',
     "alert_rules.data_quality.max_missing_rate is a fraction from 0 to 1"),
    ('{"trust": {"max_empty_share": 3}}', "alert_rules.trust.max_empty_share is a fraction from 0 to 1"),
    ('{"accuracy_drop": {"max_drop": 2}}', "alert_rules.accuracy_drop.max_drop is a fraction from 0 to 1"),
    ('{"input_drift": {"threshold": 0.2}}', "alert_rules.input_drift.threshold applies to distance statistics"),
    ('{"cohort_tags": [""]}', "alert_rules.cohort_tags must name tags"),
])
def test_rules_out_of_range_are_a_422_naming_them_and_nothing_is_stored(drift_fleet, body, says):
    f = drift_fleet
    app = create_app(f.settings, f.store)
    attach_drift(app, app.state.ctx)
    client = TestClient(app)
    operator = {"Authorization": f"Bearer {create_token(f.store, 'operator')}", "Content-Type": "application/json"}
    r = client.put("/api/v1/models/clinical/alert-rules", content=body, headers=operator)
    assert r.status_code == 422 and r.json()["detail"].startswith(says), r.text
    assert f.store.one("SELECT alert_rules FROM models WHERE name = 'clinical'")[0] in (None, "{}")


def test_one_models_unreadable_rules_stop_neither_the_others_alerts_nor_the_retraining_check(drift_fleet, caplog):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    with f.store.write() as c:  # "aardvark", evaluated first: rules a JSON parser refuses, and a window (stored
        # before the bound existed) that no date can start at
        c.execute("INSERT INTO models SELECT 'aardvark', owner, oncall, retrain_every_s, last_retrained, retrain_hook,"
                  " retrain_on_drift, '{', created FROM models WHERE name = 'clinical'")
        c.execute("INSERT INTO models SELECT 'badger', owner, oncall, retrain_every_s, last_retrained, retrain_hook,"
                  " retrain_on_drift, '{\"window_s\": 1e11}', created FROM models WHERE name = 'clinical'")
        c.execute("INSERT INTO models SELECT 'civet', owner, oncall, retrain_every_s, last_retrained, retrain_hook,"
                  " retrain_on_drift, '{\"input_drift\": {\"correction\": \"fdr\"}}', created FROM models"
                  " WHERE name = 'clinical'")
        c.execute("UPDATE models SET retrain_every_s = 86400, last_retrained = ? WHERE name = 'clinical'",
                  (time.time() - 2 * 86400,))
    app = create_app(f.settings, f.store)
    svc = attach_drift(app, app.state.ctx)

    res = svc.run_once()

    assert sorted(a["kind"] for a in _active(f)) == ["input_drift", "retraining_due"]
    assert len(res.opened) == 1
    # civet's stored correction (accepted before the value checks) falls back to its default alone: no error
    assert [e.split(":")[0] for e in res.errors] == ["aardvark", "badger"], res.errors
    assert "evaluation failed: JSONDecodeError" in res.errors[0]
    assert "window_s must be a number of seconds" in res.errors[1] and "the defaults apply" in res.errors[1]
    assert "edgefleet_drift_evaluation_errors_total 2" in svc.metrics()
    logged = [r.getMessage() for r in caplog.records if r.name == "edgefleet.drift"]
    svc.run_once()  # the same problems again: counted, not logged again
    assert "edgefleet_drift_evaluation_errors_total 4" in svc.metrics()
    assert [r.getMessage() for r in caplog.records if r.name == "edgefleet.drift"] == logged and len(logged) == 2


def test_stored_rules_from_before_the_value_checks_keep_everything_but_the_bad_values(drift_fleet, caplog,
                                                                                     monkeypatch):
    """Set now, these values are refused; stored before the checks existed, each falls back to its default alone,
    and what the owner turned off stays off (the whole document was dropped for the defaults, found by a diff
    review)."""
    import edgefleet_contracts.process as process

    monkeypatch.setattr(process, "_warned", set())  # what this process has logged already
    f = drift_fleet
    stored = {"input_drift": {"enabled": False, "correction": "fdr"}, "error_rate": {"max_rate": 5},
              "window_s": 7200, "cohort_tags": ["site", ""]}
    with pytest.raises(RequestError, match="correction 'fdr' is not a correction"):
        alerts.set_rules(f.store, "clinical", stored)
    with f.store.write() as c:
        c.execute("UPDATE models SET alert_rules = ? WHERE name = 'clinical'", (json.dumps(stored),))
    with caplog.at_level(logging.WARNING, logger="edgefleet.alerts"):
        r = alerts.rules_for(f.store, "clinical")
    assert r.enabled["input_drift"] is False and r.window_s == 7200 and r.cohort_tags == ["site"]
    assert r.health.input_drift.correction == "holm" and r.error_rate.max_rate == 0.05
    assert "stored alert_rules.input_drift.correction 'fdr' is not a correction" in caplog.text


def test_retraining_due_raises_one_event_and_runs_the_hook(drift_fleet, tmp_path):
    f = drift_fleet
    out = tmp_path / "hook-ran.txt"
    script = f"import os, pathlib; pathlib.Path({str(out)!r}).write_text(os.environ['EDGEFLEET_MODEL'] + ' ' + " \
             "os.environ['EDGEFLEET_REASON'])"
    hook = f"{sys.executable} -c \"{script}\""
    now = time.time()
    with f.store.write() as c:
        c.execute("UPDATE models SET retrain_every_s = 86400, last_retrained = ?, retrain_hook = ?",
                  (now - 2 * 86400, hook))
    [run] = retraining.check_due(f.store, now)
    assert retraining.check_due(f.store, now + 60) == []  # one per due period
    due = _active(f, "retraining_due")
    assert len(due) == 1 and due[0]["severity"] == "info" and due[0]["delivery"]["state"] == "pending"
    assert "(every 1 day; last retrained" in due[0]["summary"]  # as `models show` writes a cadence
    assert len(retraining.events(f.store, "retraining_due")) == 1
    assert retraining.run_hook(f.store, run) == 0
    assert out.read_text() == "clinical due"
    ev = retraining.events(f.store, "retrain_hook")[0]["detail"]
    assert ev["exit_status"] == 0 and ev["reason"] == "due"
    failing = retraining.HookRun("clinical", "1.0.0", f"{sys.executable} -c \"raise SystemExit(3)\"", "due", None)
    assert retraining.run_hook(f.store, failing) == 3
    slow = retraining.HookRun("clinical", "1.0.0", f"{sys.executable} -c \"import time; time.sleep(5)\"", "due", None)
    assert retraining.run_hook(f.store, slow, timeout_s=0.3) is None
    assert retraining.events(f.store, "retrain_hook")[0]["detail"]["timed_out"] is True
    assert retraining.run_hook(f.store, retraining.HookRun("clinical", None, "/no/such/hook", "due", None)) is None
    assert "could not start" in retraining.events(f.store, "retrain_hook")[0]["detail"]["error"]
    with f.store.write() as c:  # retrained: the due alert resolves itself
        c.execute("UPDATE models SET last_retrained = ?", (now,))
    assert retraining.check_due(f.store, now + 120) == []
    assert _active(f, "retraining_due") == []


def test_a_drift_alert_runs_the_hook_of_a_model_that_retrains_on_drift(drift_fleet, tmp_path):
    f = drift_fleet
    f.cohorts()
    with f.store.write() as c:
        c.execute("UPDATE models SET retrain_on_drift = 1, retrain_hook = ?", (f"{sys.executable} -c pass",))
    opened = alerts.evaluate(f.store).opened
    [run] = retraining.on_drift_alerts(f.store, opened)
    assert (run.model, run.version, run.reason, run.alert_id) == ("clinical", "1.0.0", "drift", min(opened))
    assert retraining.run_hook(f.store, run) == 0


def test_the_drift_service_evaluates_delivers_and_exports_metrics(drift_fleet, receiver):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    _route_to(f, receiver.url)
    settings = ServerSettings(data_dir=Path(f.settings.data_dir), broker="none", drift_interval_seconds=0.2)
    app = create_app(settings, f.store)
    svc = attach_drift(app, app.state.ctx, delivery=FAST, delivery_poll_s=0.05)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not receiver.requests:
            time.sleep(0.02)
        assert receiver.requests and receiver.requests[0][1]["kind"] == "input_drift"
        text = client.get("/metrics").text
        assert 'edgefleet_alerts{state="open"} 1' in text
        assert "edgefleet_drift_evaluations_total" in text and svc.evaluations >= 1
        assert 'edgefleet_alert_delivery_attempts_total{outcome="delivered"} 1' in text
    assert svc._threads == []  # stopped with the app
    assert len(_active(f, "input_drift")) == 1  # repeated evaluations kept one alert


def test_a_store_that_cannot_record_a_delivery_stops_the_page_instead_of_repeating_it(drift_fleet, receiver):
    """The audit's storm: the POST went out, the write recording it failed, and every pass (26 a second) sent the
    page again. The attempt is claimed (stored) before the POST and failed passes back off: no page while the
    store refuses writes, exactly one once it takes them again."""
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    _route_to(f, receiver.url)
    [alert_id] = alerts.evaluate(f.store).opened
    with f.store.write() as c:  # the store refuses every change to alerts, as a full disk would
        c.execute("CREATE TRIGGER full BEFORE UPDATE ON alerts BEGIN SELECT RAISE(ABORT, 'database or disk is "
                  "full (simulated)'); END")
    settings = ServerSettings(data_dir=Path(f.settings.data_dir), broker="none", drift_interval_seconds=3600)
    app = create_app(settings, f.store)
    svc = attach_drift(app, app.state.ctx, delivery=FAST, delivery_poll_s=0.01)
    with TestClient(app) as client:
        assert wait_until(lambda: svc.delivery_failures >= 2, 10)
        time.sleep(1.0)
        assert receiver.requests == []  # never sent while it could not be recorded
        assert svc.delivery_failures <= 6  # backed off: 0.5 s, 1 s, 2 s, ... not a pass every 10 ms
        assert "edgefleet_alert_delivery_pass_failures_total" in client.get("/metrics").text
        with f.store.write() as c:
            c.execute("DROP TRIGGER full")
        assert wait_until(lambda: alerts.get_alert(f.store, alert_id)["delivery"]["state"] == "delivered", 15)
    assert len(receiver.requests) == 1


def test_a_slow_failing_webhook_does_not_shorten_the_backoff(drift_fleet):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    slow = Receiver(always=503)
    handler = slow.server.RequestHandlerClass
    answer = handler.do_POST

    def late(self: Any) -> None:  # the on-call route answers after 0.5 s, with an error
        time.sleep(0.5)
        answer(self)

    handler.do_POST = late  # type: ignore[method-assign]
    try:
        _route_to(f, slow.url)
        [alert_id] = alerts.evaluate(f.store).opened
        asked = time.time()
        assert alerts.deliver_due(f.store, DeliveryConfig(timeout_s=5.0, retries=3, backoff_base_s=0.3)) == {
            "delivered": 0, "retry": 1, "failed": 0}
        nxt = f.store.one("SELECT next_attempt FROM alerts WHERE id = ?", (alert_id,))[0]
        assert nxt >= asked + 0.5 + 0.3  # counted from the answer, not from before the POST
    finally:
        slow.close()


def test_the_alerts_cli_lists_acknowledges_resolves_sets_rules_and_evaluates(drift_fleet, capsys):
    from fleet_server.cli import main as fleet_cli

    f = drift_fleet
    f.cohorts()
    _fleet_only(f)
    data = ["--data", str(f.settings.data_dir)]
    assert fleet_cli(["alerts", "evaluate", "--no-deliver", "--json", *data]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["opened"]) == 1 and out["scopes"] == 1 and out["errors"] == []
    [alert_id] = out["opened"]
    assert fleet_cli(["alerts", "list", "--state", "open", *data]) == 0
    listed = capsys.readouterr().out
    opened = alerts.get_alert(f.store, alert_id)["created"]
    assert f"{alert_id}  open" in listed and f"opened {opened}  updated " in listed  # when it opened, not only
    # when its evidence was last refreshed (found by a README walkthrough audit)
    assert fleet_cli(["alerts", "ack", str(alert_id), "--by", "ann", *data]) == 0
    assert alerts.get_alert(f.store, alert_id)["acknowledged_by"] == "ann"
    assert fleet_cli(["alerts", "resolve", str(alert_id), *data]) == 0
    assert "resolved" in capsys.readouterr().out
    assert fleet_cli(["alerts", "rules", "clinical", "--set", '{"latency_p95": {"max_p95_ms": 50}}', *data]) == 0
    assert json.loads(capsys.readouterr().out)["latency_p95"]["max_p95_ms"] == 50
    assert fleet_cli(["alerts", "rules", "clinical", "--set", '{"latency": {}}', *data]) == 1
    assert "alert_rules.latency is not a rule" in capsys.readouterr().err
    assert fleet_cli(["alerts", "events", "--kind", "alert_resolved", *data]) == 0
    assert "alert_resolved" in capsys.readouterr().out
    assert fleet_cli(["alerts", "ack", "999", *data]) == 1
    assert "no alert 999" in capsys.readouterr().err


def test_a_cohort_that_alone_has_reported_is_still_judged_as_a_cohort():
    """Which scopes are judged must not depend on whose summaries arrived first: when only site north's devices
    have reported, north is still a cohort of the enrolled fleet (its drift pages as site=north, not fleet)."""
    from fleet_server.alerts.conditions import scopes
    from fleet_server.alerts.rules import AlertRules
    from fleet_server.health import Aggregate

    tags = {"n1": {"site": "north"}, "n2": {"site": "north"}, "s1": {"site": "south"}, "s2": {"site": "south"}}
    reporting = {d: tags[d] for d in ("n1", "n2")}
    agg = Aggregate(None, None, "", "", {d: None for d in reporting}, {}, reporting)  # type: ignore[arg-type]
    assert [s for s, _ in scopes(agg, AlertRules())] == ["fleet"]  # without the enrolled fleet: ambiguous
    assert scopes(agg, AlertRules(), tags) == [("fleet", ["n1", "n2"]), ("site=north", ["n1", "n2"])]
    everyone_north = {d: {"site": "north"} for d in tags}
    assert [s for s, _ in scopes(agg, AlertRules(), everyone_north)] == ["fleet"]  # a tag all share: no cohort


def test_the_headline_is_the_cohort_that_isolates_the_condition():
    """Site north drifts; hardware rpi4 and rpi5 each hold one north device (smaller cohorts, also flagged):
    the page names site north, which isolates the shift, not the smallest flagged cohort."""
    from fleet_server.alerts.conditions import Condition, group_conditions

    def cond(scope: str, n: int) -> tuple[str, Condition]:
        return "1.0.0", Condition("input_drift", scope, f"drift in {scope}", {"device_count": n})

    found = [cond("fleet", 6), cond("site=north", 2), cond("hw=rpi4", 1), cond("hw=rpi5", 1)]
    (_, page), = group_conditions(found)
    assert page.evidence["scope"] == "site=north"
    assert [s["scope"] for s in page.evidence["scopes"]] == ["site=north", "hw=rpi4", "hw=rpi5", "fleet"]
    (_, page), = group_conditions([cond("fleet", 6), cond("hw=rpi4", 3)])
    assert page.evidence["scope"] == "hw=rpi4"


def test_a_settle_period_holds_the_page_and_sends_the_latest_evidence(drift_fleet):
    f = drift_fleet
    f.cohorts()
    _fleet_only(f, settle_s=30)
    rec = Receiver()
    try:
        _route_to(f, rec.url)
        t0 = time.time()
        [alert_id] = alerts.evaluate(f.store, t0).opened
        assert alerts.deliver_due(f.store, FAST, t0 + 1) == {"delivered": 0, "retry": 0, "failed": 0}
        assert alerts.get_alert(f.store, alert_id)["delivery"]["state"] == "pending"
        assert alerts.evaluate(f.store, t0 + 20).updated == [alert_id]  # a second evaluation refreshes it
        assert alerts.deliver_due(f.store, FAST, t0 + 31) == {"delivered": 1, "retry": 0, "failed": 0}
        [(_, body)] = rec.requests
        assert body["id"] == alert_id and body["evidence"]["evaluations"] == 2  # the evidence as of delivery
    finally:
        rec.close()
    with pytest.raises(RequestError, match="settle_s"):
        alerts.parse_rules({"settle_s": -1})
