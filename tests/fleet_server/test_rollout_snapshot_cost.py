"""The rollout loop builds a health snapshot only on the steps that judge the gates.

A snapshot parses every summary the stage's devices sent since the stage started: 0.4 s on a 1,000-device fleet
load database with 89 devices on the new version, and it grows with every device and every minute. It used to be
built on every tick (each second), also while devices were still being asked to move and while the stage baked,
in the server process that also serves the package downloads and ingests the devices' reports.
"""

from __future__ import annotations

import time

from fleet_server.rollouts import service
from fleet_server.rollouts.engine import Rollout, step
from fleet_server.rollouts.gates import Snapshot

from .test_rollouts import _devices_follow, fleet, v110

__all__ = ["fleet", "v110"]  # fixtures shared with test_rollouts


def test_no_snapshot_is_built_while_the_stage_bakes_and_one_per_step_once_it_is_judged(fleet, monkeypatch):
    settings, store, svc = fleet
    built: list[float] = []
    real = service.snapshot

    def counted(*a, **kw):  # a spy: the real snapshot, counted
        built.append(time.time())
        return real(*a, **kw)

    monkeypatch.setattr(service, "snapshot", counted)
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600)
    t0 = time.time()
    for i in range(5):  # targets every device, then bakes
        svc.tick(now=t0 + i)
        _devices_follow(store)
    assert built == []
    assert service.get(store, rid).state == "running"
    svc.tick(now=t0 + 3600 + 1)  # baked: the gates are judged on this step
    assert len(built) == 1
    assert service.get(store, rid).state == "completed"


def test_the_engine_calls_a_snapshot_function_only_when_it_judges_the_gates():
    calls: list[int] = []

    def snap() -> Snapshot:
        calls.append(1)
        return Snapshot(targeted=2, reporting_new=0, install_failures=0)

    r = Rollout(id="r", model="m", version="2", previous="1", cohort={}, stages=[100], bake_seconds=10,
                stage_started=0.0)
    step(r, ["a", "b"], snap, now=1.0)  # asks both to move
    step(r, ["a", "b"], snap, now=5.0)  # baking
    assert calls == []
    step(r, ["a", "b"], snap, now=11.0)  # judged (waits: no data yet)
    assert calls == [1] and r.state == "running"
