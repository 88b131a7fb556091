"""A rollout survives what an audit did to it (2026-11-28):

* a server dying between a step and the desired states it asks for (the step and the states commit together, so
  a device is never counted as asked without being asked);
* a broker that comes back without the retained desired states it had acknowledged (a ``kill -9`` of Mosquitto
  loses what changed since its last save): every desired state is published again after the publisher
  reconnects;
* a stage's bake counts from when its last device was asked, so a rate limit, a maintenance window or an approval
  never eats the bake.

Real data folder, real store, real Mosquitto; the engine's pure step for the timing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet_contracts.desired import accept_desired
from edgefleet_contracts.signing import load_public_key
from edgefleet_contracts.timeutil import utcnow
from edgefleet_contracts.topics import subscription
from fleet_server.rollouts import service
from fleet_server.rollouts.engine import Rollout, step
from fleet_server.rollouts.gates import GroupStats, Snapshot
from fleet_server.rollouts.publisher import MqttPublisher
from tests.brokers import Mosquitto, Subscriber
from tests.fleet_server.test_rollouts import _desired, fleet, v110  # noqa: F401 - the fixtures
from tests.support import wait_until


def test_a_step_whose_desired_states_fail_to_be_written_is_not_committed(fleet: Any,  # noqa: F811
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=0)

    def power_cut(*_: Any, **__: Any) -> Any:
        raise RuntimeError("power cut while signing")

    monkeypatch.setattr(service, "sign_desired", power_cut)
    svc.tick()  # the failed step is logged and counted; the other rollouts would go on
    assert svc.errors == 1
    r = service.get(store, rid)
    assert r.targeted == {} and _desired(store) == {}  # nothing counts as asked: the next step asks again
    assert "target" not in [d["kind"] for d in service.status(store, rid)["decisions"]]

    monkeypatch.undo()
    svc.tick()
    r = service.get(store, rid)
    assert len(r.targeted) == 20 and set(_desired(store)) == set(r.targeted)


def test_an_abort_and_its_desired_states_commit_together(fleet: Any, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600)
    svc.tick()
    assert set(_desired(store).values()) == {"1.1.0"}

    monkeypatch.setattr(service, "sign_desired", lambda *_: (_ for _ in ()).throw(RuntimeError("power cut")))
    with pytest.raises(RuntimeError, match="power cut"):
        service.set_state(store, svc.signer, rid, "abort", "olga")
    assert service.get(store, rid).state == "running"  # not aborted with its devices left on 1.1.0
    monkeypatch.undo()
    service.set_state(store, svc.signer, rid, "abort", "olga")
    assert service.get(store, rid).state == "aborted" and set(_desired(store).values()) == {"1.0.0"}


def test_desired_states_are_published_again_after_the_broker_lost_them(fleet: Any, tmp_path: Any) -> None:  # noqa: F811
    settings, store, svc = fleet
    broker = Mosquitto(tmp_path / "mosquitto").start()  # no persistence: a restart forgets every retained message
    svc.publisher = MqttPublisher(broker.url)
    try:
        service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600)
        svc.tick()
        assert store.one("SELECT COUNT(*) FROM desired WHERE published = 1")[0] == 20

        def retained() -> dict[str, int]:
            with Subscriber(broker, [subscription(settings.fleet, "desired")]) as sub:
                sub.wait_for(lambda m: len(m) >= 20, 3.0)
                return {m.topic: accept_desired(json.loads(m.payload), load_public_key(settings.fleet_pub),
                                                device_id=m.topic.split("/")[2], last_seq=0, now=utcnow()).seq
                        for m in sub.messages() if m.retain}

        assert len(retained()) == 20
        broker.restart()
        assert retained() == {}  # the broker came back without them
        assert wait_until(lambda: svc.publisher is not None and svc.publisher.connects == 2, 10.0)
        svc.publish_pending()
        after = retained()
        assert len(after) == 20 and set(after.values()) == {1}  # the same states (same seq), not new ones
    finally:
        if svc.publisher is not None:
            svc.publisher.close()
        broker.close()


def _snap() -> Snapshot:
    return Snapshot(targeted=4, reporting_new=4, install_failures=0,
                    new=GroupStats(devices=4, predictions=400, p95_ms=1.0, est_accuracy=0.9),
                    control=GroupStats(devices=4, predictions=400, p95_ms=1.0, est_accuracy=0.9))


def test_a_rate_limited_stage_bakes_from_when_its_last_device_was_asked() -> None:
    r = Rollout(id="r-1", model="m", version="2", previous="1", cohort={}, stages=[100], bake_seconds=30,
                max_per_minute=2, stage_started=0.0)
    members = ["a", "b", "c", "d"]
    judged: list[float] = []

    def at(now: float) -> list[str]:
        res = step(r, members, lambda: (judged.append(now), _snap())[1], now)
        return [d.kind for d in res.decisions]

    assert at(0) == ["target"] and sorted(r.targeted) == ["a", "b"]
    assert at(30) == []  # the rate limit: the others wait a minute; no bake while they do
    assert at(61) == ["target", "bake"] and r.stage_started == 61
    assert at(62) == [] and at(90) == [] and judged == []  # 29 s after the last device was asked
    assert at(92) == ["complete"] and judged == [92]


def test_a_stage_that_waits_for_its_window_bakes_after_the_window_opens() -> None:
    # window 02:00-04:00 UTC; the stage begins at 01:00 and may only ask at 02:00
    r = Rollout(id="r-2", model="m", version="2", previous="1", cohort={}, stages=[100], bake_seconds=90,
                window="02:00-04:00", stage_started=3600.0)
    members = ["a", "b"]
    assert step(r, members, _snap, 3600).to_target == []
    assert step(r, members, _snap, 7200).to_target == ["a", "b"]  # 02:00: asked, an hour after the stage began
    assert [d.kind for d in step(r, members, _snap, 7202).decisions] == []  # the old code advanced here
    assert [d.kind for d in step(r, members, _snap, 7291).decisions] == ["complete"]


def test_a_device_joining_a_baking_stage_is_asked_without_restarting_the_bake() -> None:
    r = Rollout(id="r-3", model="m", version="2", previous="1", cohort={}, stages=[100], bake_seconds=30,
                stage_started=0.0)
    assert [d.kind for d in step(r, ["a", "b"], _snap, 0).decisions] == ["target", "bake"]
    # a device enrolled (or re-tagged into the cohort) every 20 s: each is asked, the bake goes on
    for t, members in ((20, ["a", "b", "c"]), (40, ["a", "b", "c", "d"])):
        res = step(r, members, _snap, t)
        assert [d.kind for d in res.decisions] == ["target"] and r.stage_started == 0
    assert [d.kind for d in step(r, ["a", "b", "c", "d"], _snap, 41).decisions] == ["complete"]


def test_the_bake_state_survives_a_restart(fleet: Any) -> None:  # noqa: F811
    _, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600)
    svc.tick()
    r = service.get(store, rid)  # as a restarted server reads it
    assert r.baking and [d["kind"] for d in service.status(store, rid)["decisions"]][-2:] == ["target", "bake"]


def test_one_rollouts_failing_step_does_not_stop_the_others(fleet: Any, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, store, svc = fleet
    first = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[100],
                          bake_seconds=3600)
    with store.write() as c:  # a second rollout (site b), listed after the first
        c.execute("INSERT INTO rollouts SELECT 'r-zz', kind, model, version, previous, '{\"site\": \"b\"}', stages,"
                  " bake_seconds, max_per_minute, maint_window, thresholds, approve_stages, state, stage,"
                  " stage_started, approved, targeted, created, created_by, updated FROM rollouts WHERE id = ?",
                  (first,))
    real = service.stage_devices

    def broken_for_the_first(model: str, devices: Any, cohort: Any, percent: float) -> Any:
        if cohort == {"site": "a"}:
            raise RuntimeError("a bug in one rollout")
        return real(model, devices, cohort, percent)

    monkeypatch.setattr(service, "stage_devices", broken_for_the_first)
    svc.tick()
    assert svc.errors == 1 and service.get(store, first).targeted == {}
    assert "target" in [d["kind"] for d in service.status(store, "r-zz")["decisions"]]
