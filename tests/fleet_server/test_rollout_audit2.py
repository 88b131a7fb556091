"""Found by the second audit with real agents: a stale result from before a rollout's attempt condemning it, a
rollback to a version devices refuse reported as done, double pauses, and bake time counted while paused."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest

from edgefleet_contracts.timeutil import fmt, utcnow
from fleet_server.errors import ConflictError
from fleet_server.rollouts import service
from fleet_server.store import Store

# The fleet of test_rollouts: 20 devices on clinical 1.0.0 (dev-00..11 site a, dev-12..19 site b), 1.1.0 published.
from tests.fleet_server.test_rollouts import _desired, _summary, fleet, v110  # noqa: F401 - fixtures


@pytest.fixture()
def rig(fleet: Any) -> Any:  # noqa: F811 - the imported fixture
    return fleet


def _state(store: Store, dev: str, active: str, *, standby: str | None = None,
           last_result: dict | None = None) -> None:
    rep = {"active": {"name": "clinical", "version": active},
           "standby": {"name": "clinical", "version": standby} if standby else None,
           "update_state": "idle", "last_result": last_result}
    with store.write() as c:
        c.execute("UPDATE devices SET reported = ?, last_seen = ? WHERE device_id = ?",
                  (json.dumps(rep), time.time(), dev))


def _follow(store: Store, last_result: dict | None = None) -> None:
    """Devices run what they were asked to (1.0.0 when never asked), with ``last_result`` and summaries."""
    want = _desired(store)
    for i in range(20):
        dev = f"dev-{i:02d}"
        v = want.get(dev, "1.0.0")
        _state(store, dev, v, standby="1.0.0" if v == "1.1.0" else None, last_result=last_result)
        _summary(store, dev, v)


def test_a_rollback_result_from_an_aborted_attempt_does_not_fail_the_next_rollout_of_that_version(rig):
    settings, store, svc = rig
    first = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[100],
                          bake_seconds=3600)
    svc.tick()
    service.set_state(store, svc.signer, first, "abort", "alice")
    # The abort sent the devices back: their last result says they rolled back from 1.1.0, a minute ago.
    stale = {"status": "rolled_back", "reason": "desired", "version": "1.0.0",
             "at": fmt(utcnow() - timedelta(seconds=60)), "details": {"from": {"name": "clinical", "version": "1.1.0"}}}
    _follow(store, stale)
    again = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[100],
                          bake_seconds=0, thresholds={"min_predictions": 10})
    svc.tick()
    _follow(store, stale)  # on 1.1.0 (probation), the last recorded result still the abort's
    svc.tick()
    st = service.status(store, again)
    assert st["state"] == "completed", st["decisions"]
    assert st["devices"] == {"on_new_version": 12}

    # A failure recorded after this rollout asked the devices to move still counts.
    fresh_failure = {**stale, "at": fmt(utcnow() + timedelta(seconds=1))}
    service.rollback(store, svc.signer, "clinical", "1.0.0", {"site": "a"}, "alice")
    _follow(store)
    rid = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[100],
                        bake_seconds=0, thresholds={"min_predictions": 10})
    svc.tick()
    for i in range(12):
        _state(store, f"dev-{i:02d}", "1.0.0", last_result=fresh_failure)
        _summary(store, f"dev-{i:02d}", "1.0.0")
    svc.tick()
    st = service.status(store, rid)
    assert st["state"] == "rolled_back" and "install_failure_rate" in st["decisions"][-1]["detail"], st


def test_a_rollback_to_a_version_devices_would_refuse_is_refused_naming_them(rig):
    settings, store, svc = rig
    for i in range(20):  # site a: 1.1.0 holding 1.0.0 in standby, but dev-01 and dev-02 hold nothing
        _state(store, f"dev-{i:02d}", "1.1.0", standby=None if i in (1, 2) else "1.0.0")
    says = r"2 of 12 device\(s\).*\(dev-01 \(runs 1.1.0, holds nothing in standby\), dev-02 "
    with pytest.raises(ConflictError, match=says) as err:
        service.rollback(store, svc.signer, "clinical", "1.0.0", {"site": "a"}, "carol", cohort_name="--cohort")
    assert "--cohort" in str(err.value)
    assert _desired(store) == {} and service.list_rollouts(store) == []  # nothing sent, nothing recorded
    # Without them every device can move (dev-01 leaves the cohort, dev-02 went back to 1.0.0, dev-03 has not
    # reported: it judges for itself): the decision says how.
    _state(store, "dev-02", "1.0.0")
    with store.write() as c:
        c.execute("UPDATE devices SET reported = NULL WHERE device_id = 'dev-03'")
        c.execute("UPDATE devices SET tags = ? WHERE device_id = 'dev-01'", (json.dumps({"site": "c"}),))
    rid = service.rollback(store, svc.signer, "clinical", "1.0.0", {"site": "a"}, "carol")
    d = service.status(store, rid)["decisions"][0]
    assert d["evidence"]["moves"] == {"standby": 9, "already": 1, "unknown": 1}, d
    assert "9 switch to it from their standby slot; 1 already run it; 1 have not reported" in d["detail"]
    assert len(_desired(store)) == 11


def test_pausing_a_paused_rollout_is_refused_and_logs_nothing(rig):
    settings, store, svc = rig
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600)
    said = service.set_state(store, svc.signer, rid, "pause", "alice")
    assert said["state"] == "paused" and said["message"].startswith("paused")
    with pytest.raises(ConflictError, match="already paused; resume it"):
        service.set_state(store, svc.signer, rid, "pause", "bob")
    assert [d["kind"] for d in service.status(store, rid)["decisions"]] == ["start", "pause"]


def test_approve_says_what_the_operator_did_not_the_state_before_the_tick(rig):
    settings, store, svc = rig
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=0,
                        approve_stages=[1])
    said = service.set_state(store, svc.signer, rid, "approve", "alice")
    assert said["message"] == "approved stage 1; the engine moves its devices at its next tick", said
    assert _desired(store) == {}
    svc.tick()
    assert len(_desired(store)) == 20


def test_bake_time_counts_only_while_the_rollout_is_not_paused(rig):
    settings, store, svc = rig
    t0 = time.time()
    rid = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[100],
                        bake_seconds=100, thresholds={"min_predictions": 10}, now=t0)
    svc.tick(now=t0)  # every device asked: the bake starts (the followers' summaries arrive after it)
    _follow(store)
    service.set_state(store, svc.signer, rid, "pause", "alice", now=t0 + 10)
    service.set_state(store, svc.signer, rid, "resume", "alice", now=t0 + 90)  # 80 s paused
    _follow(store)
    svc.tick(now=t0 + 105)  # 105 s since the stage started, 25 s of them baking
    assert service.status(store, rid)["state"] == "running"
    svc.tick(now=t0 + 181)  # 101 s baking
    st = service.status(store, rid)
    assert st["state"] == "completed", st["decisions"]
