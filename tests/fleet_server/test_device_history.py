"""Migration 3: every change of a device's reported install result or active version becomes one history event,
in the same transaction as the report; a report that changes neither (a newer `at` only) adds nothing."""

from __future__ import annotations

import json
from pathlib import Path

from fleet_server.dashboard.data import device_history
from fleet_server.retraining import events
from fleet_server.store import Store, statements


def _report(at: str, active: str | None, result: dict[str, str] | None) -> str:
    return json.dumps({"type": "edgefleet.report", "spec": 1, "device_id": "d1", "at": at,
                       "active": {"name": "clinical", "version": active} if active else None, "standby": None,
                       "update_state": "idle", "last_result": result, "agent_version": "1", "desired_seq": 0})


def test_reported_state_changes_become_history(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.sqlite")
    with store.write() as c:
        c.execute("INSERT INTO devices (device_id, public_key, fleet, enrolled) VALUES ('d1', 'k', 'f', 1)")
    updates = [
        _report("2026-01-01T00:00:00Z", None, None),  # first report: recorded
        _report("2026-01-01T00:01:00Z", None, None),  # only `at` moved: not recorded
        _report("2026-01-01T00:02:00Z", "1.0.0", {"status": "committed", "version": "1.0.0"}),
        _report("2026-01-01T00:03:00Z", "1.0.0", {"status": "failed", "version": "2.0.0", "reason": "smoke"}),
    ]
    for doc in updates:
        with store.write() as c:
            c.execute("UPDATE devices SET reported = ? WHERE device_id = 'd1'", (doc,))
    with store.write() as c:
        c.execute("UPDATE devices SET last_seen = 5 WHERE device_id = 'd1'")  # not a report: nothing
    history = device_history(store, "d1")
    assert [h["at"] for h in history] == ["2026-01-01T00:03:00Z", "2026-01-01T00:02:00Z", "2026-01-01T00:00:00Z"]
    assert history[0]["last_result"] == {"status": "failed", "version": "2.0.0", "reason": "smoke"}
    assert history[1]["active"] == {"name": "clinical", "version": "1.0.0"}
    # the retraining/alert event listing is not flooded by device history
    assert all(e["kind"] != "device_state" for e in events(store))
    assert len(events(store, kind="device_state")) == 3


def test_a_trigger_body_is_one_statement() -> None:
    sql = "CREATE TABLE t (a); CREATE TRIGGER x AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END; SELECT 3;"
    trigger = "CREATE TRIGGER x AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;"
    assert statements(sql) == ["CREATE TABLE t (a);", trigger, "SELECT 3;"]
