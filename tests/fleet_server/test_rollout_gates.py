"""The p95 latency gate (fleet_server/rollouts/gates.py) compares the new version with its control group, and
like the device's probation it fails only when the ratio is over its limit *and* the p95 grew by more than a
floor: a sub-millisecond model seen a few histogram bins slower on a busy device is noise, not a regression."""

from __future__ import annotations

import pytest

from fleet_server.rollouts.gates import GroupStats, Snapshot, evaluate, failing


def _p95_gate(new_ms: float, control_ms: float, **thresholds: float) -> tuple[bool, str]:
    snap = Snapshot(targeted=2, reporting_new=2, install_failures=0,
                    new=GroupStats(devices=2, predictions=500, errors=0, p95_ms=new_ms),
                    control=GroupStats(devices=18, predictions=5000, errors=0, p95_ms=control_ms))
    gate = next(g for g in evaluate(snap, thresholds) if g.name == "p95_latency_ratio")
    return gate.passed, gate.detail


@pytest.mark.parametrize(("new_ms", "control_ms", "passes"), [
    (0.2, 0.05, True),   # 4x, but 0.15 ms more: scheduling noise on a tiny model
    (0.54, 0.05, True),  # 10.8x, 0.49 ms more: still within the floor
    (0.6, 0.05, False),  # 0.55 ms more and 12x: a regression
    (5.0, 2.0, False),   # 2.5x and 3 ms more
    (3.9, 2.0, True),    # 1.95x: under the ratio limit whatever the increase
])
def test_the_p95_gate_fails_only_over_both_the_ratio_and_the_floor(new_ms: float, control_ms: float,
                                                                    passes: bool) -> None:
    passed, detail = _p95_gate(new_ms, control_ms)
    assert passed is passes, detail
    assert ("noise floor" in detail) is (passes and new_ms / control_ms > 2.0)


def test_the_floor_is_a_threshold_a_rollout_can_set() -> None:
    assert _p95_gate(0.2, 0.05, min_p95_increase_ms=0.0)[0] is False  # no floor: the 4x fails
    assert _p95_gate(5.0, 2.0, min_p95_increase_ms=10.0)[0] is True
    snap = Snapshot(targeted=1, reporting_new=1, install_failures=0,
                    new=GroupStats(devices=1, predictions=100, p95_ms=0.6),
                    control=GroupStats(devices=5, predictions=100, p95_ms=0.05))
    assert [g.name for g in failing(evaluate(snap, {}))] == ["p95_latency_ratio"]
