"""`rollout status` says why devices have not moved: the current stage's devices the rollout has not asked yet
(its rate limit), and devices that hold the desired state and wait, with the reason their reports give (their own
maintenance window). Real data folder and store, the CLI's text; the device side is
tests/device_agent/test_desired.py (the report carries ``desired_outcome``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.report import Report
from fleet_server.rollouts import service
from tests.fleet_server.conftest import run_cli
from tests.fleet_server.test_rollouts import fleet, v110  # noqa: F401 - the fixtures


def _defer(store: Any, dev: str, seq: int, reason: str) -> None:
    with store.write() as c:
        rep = json.loads(c.execute("SELECT reported FROM devices WHERE device_id = ?", (dev,)).fetchone()[0])
        rep["desired_outcome"] = {"seq": seq, "status": "deferred", "reason": reason,
                                  "message": "waiting for the maintenance window 03:00-04:00 UTC"}
        c.execute("UPDATE devices SET reported = ? WHERE device_id = ?", (json.dumps(rep), dev))


def test_status_counts_devices_not_yet_asked_and_devices_that_wait_with_their_reason(fleet: Any) -> None:  # noqa: F811
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=60,
                        max_per_minute=5)
    svc.tick()
    st = service.status(store, rid)
    assert st["targeted"] == 5 and st["not_yet_asked"] == 15 and st["devices"] == {"pending": 5}

    asked = sorted(service.get(store, rid).targeted)
    seq = store.one("SELECT seq FROM desired WHERE device_id = ?", (asked[0],))[0]
    _defer(store, asked[0], seq, "maintenance_window")
    _defer(store, asked[1], seq - 1, "maintenance_window")  # about an older desired state: not this one
    st = service.status(store, rid)
    assert st["devices"] == {"deferred: maintenance_window": 1, "pending": 4}

    rc, out, _ = run_cli(["rollout", "status", rid, "--data", str(settings.data_dir)])
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("  devices: "))
    assert line.endswith("; 15 more of this stage not asked yet") and "'deferred: maintenance_window': 1" in line, line


@pytest.mark.parametrize(("outcome", "says"), [
    ([1], "report.desired_outcome must be an object"),
    ({"status": 3}, "report.desired_outcome.status must be a string or null"),
    ({"seq": "1"}, "desired_outcome"),
])
def test_a_report_with_a_malformed_desired_outcome_is_refused(outcome: Any, says: str) -> None:
    doc = Report("dev-1", "2026-11-28T00:00:00Z", None, None, "idle", None).to_dict()
    assert Report.from_dict(doc).desired_outcome is None  # older agents send none
    with pytest.raises(SchemaError, match=says):
        Report.from_dict({**doc, "desired_outcome": outcome})
