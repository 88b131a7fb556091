"""The rollout state machine over plain data: given a rollout, what it covers and a health snapshot, decide.

States: ``running`` (a stage is baking) -> ``awaiting_approval`` (the next stage needs a human) -> ``running``
... -> ``completed``; a failed gate -> ``rolled_back`` (every device the rollout moved is sent back to the
previous version, which it still holds in its standby slot); ``paused`` (operator) freezes it (time spent paused
is not bake time); ``aborted`` (operator) stops it and sends moved devices back. Every decision is returned with
its evidence and actor so the service can write the audit log; nothing here touches the store, the clock or the
network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgefleet_contracts.timeutil import DailyWindow

from .gates import GateResult, Snapshot, evaluate, failing

TERMINAL = ("completed", "rolled_back", "aborted")


@dataclass
class Rollout:
    id: str
    model: str
    version: str
    previous: str | None
    cohort: dict[str, str]
    stages: list[float]
    bake_seconds: float
    max_per_minute: int = 0  # 0 = unlimited
    window: str = ""  # "HH:MM-HH:MM" UTC maintenance window; empty = any time
    thresholds: dict[str, float] = field(default_factory=dict)
    approve_stages: list[int] = field(default_factory=list)  # stage indexes (0-based) needing approval to start
    state: str = "running"
    stage: int = 0
    stage_started: float = 0.0
    approved: list[int] = field(default_factory=list)
    targeted: dict[str, float] = field(default_factory=dict)  # device -> time its desired state was set
    kind: str = "rollout"  # or "rollback"
    updated: float = 0.0  # when the stored row last changed (a step saves only over the row it read)
    # seconds the current stage spent paused (between a pause and its resume): not bake time. Derived from the
    # decision log when the rollout is read, not stored; reset when a stage starts.
    paused_seconds: float = 0.0
    # the current stage's bake has begun (every device it had was asked): devices that join the stage later (a
    # newly enrolled or re-tagged one) are asked without restarting it. Derived from the decision log too.
    baking: bool = False


@dataclass
class Decision:
    kind: str  # start_stage | target | bake | advance | wait | await_approval | complete | rollback | ...
    detail: str
    actor: str = "engine"
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    decisions: list[Decision] = field(default_factory=list)
    to_target: list[str] = field(default_factory=list)  # devices to move to the new version now
    to_revert: list[str] = field(default_factory=list)  # devices to send back to the previous version


def in_window(window: str, now: float) -> bool:
    """'' -> always; 'HH:MM-HH:MM' (UTC, may wrap midnight). Raises ValueError for another format."""
    return not window or DailyWindow.parse(window).is_open(datetime.fromtimestamp(now, UTC))


def step(r: Rollout, stage_members: list[str], snapshot: Snapshot | Callable[[], Snapshot | None] | None,
         now: float) -> StepResult:
    """One decision step for a running rollout. ``stage_members``: cohort devices the current stage covers.
    ``snapshot`` may be a function: it is then called only when the gates are judged (every device of the stage
    asked to move and the bake time over), since building one reads every summary of the stage so far."""
    out = StepResult()
    if r.state in TERMINAL or r.state == "paused":
        return out
    if r.state == "awaiting_approval":
        if r.stage in r.approved:
            r.state = "running"
            r.stage_started, r.paused_seconds, r.baking = now, 0.0, False
            out.decisions.append(Decision("start_stage", f"stage {r.stage + 1} approved; starting"))
        else:
            return out
    # Move the devices of the current stage that have not been asked yet (rate-limited, in the window).
    pending = [d for d in stage_members if d not in r.targeted]
    if pending and in_window(r.window, now):
        if r.max_per_minute > 0:
            recent = sum(1 for t in r.targeted.values() if now - t < 60)
            pending = pending[: max(0, r.max_per_minute - recent)]
        for d in pending:
            r.targeted[d] = now
        out.to_target = pending
        if pending:
            out.decisions.append(Decision("target", f"stage {r.stage + 1}: {len(pending)} device(s) asked to move "
                                          f"to {r.version}", evidence={"devices": pending}))
            if not r.baking and all(d in r.targeted for d in stage_members):
                # The stage's last device was just asked: its bake starts now, not when the stage began. A rate
                # limit, a maintenance window, an approval or a pause before this point is no bake time, and the
                # gates judge evidence gathered after every device of the stage was asked.
                r.stage_started, r.paused_seconds, r.baking = now, 0.0, True
                out.decisions.append(Decision("bake", f"stage {r.stage + 1}: every device asked; the gates are "
                                              f"judged after a bake of {r.bake_seconds:g} s"))
    if out.to_target or [d for d in stage_members if d not in r.targeted]:
        # Devices were just asked to move, or are still waiting (rate limit, maintenance window): the gates are
        # judged on a later step, with evidence gathered after the move.
        return out
    if now - r.stage_started - r.paused_seconds < r.bake_seconds or snapshot is None:  # paused time is not bake
        return out
    snap = snapshot() if callable(snapshot) else snapshot
    if snap is None:
        return out
    results = evaluate(snap, r.thresholds)
    evidence = {"gates": [g.to_dict() for g in results], "stage": r.stage + 1, "percent": r.stages[r.stage]}
    bad = failing(results)
    if bad:
        r.state = "rolled_back"
        out.to_revert = sorted(r.targeted)
        out.decisions.append(Decision("rollback", f"stage {r.stage + 1} failed gate(s) "
                                      f"{', '.join(g.name for g in bad)}: {_why(bad)}; sending "
                                      f"{len(out.to_revert)} device(s) back to {r.previous}", evidence=evidence))
        return out
    if not all(g.passed for g in results):
        return out  # waiting for enough data; not a failure
    if r.stage + 1 >= len(r.stages):
        r.state = "completed"
        out.decisions.append(Decision("complete", f"all {len(r.stages)} stages passed", evidence=evidence))
        return out
    r.stage += 1
    r.stage_started, r.paused_seconds, r.baking = now, 0.0, False
    if r.stage in r.approve_stages and r.stage not in r.approved:
        r.state = "awaiting_approval"
        out.decisions.append(Decision("await_approval", f"stage {r.stage} passed its gates; stage {r.stage + 1} "
                                      "needs an operator's approval", evidence=evidence))
    else:
        out.decisions.append(Decision("advance", f"stage {r.stage} passed its gates; starting stage {r.stage + 1} "
                                      f"({r.stages[r.stage]:g}%)", evidence=evidence))
    return out


def _why(bad: list[GateResult]) -> str:
    return "; ".join(f"{g.name}={g.value if g.value is None else round(g.value, 4)} (limit {g.threshold}): "
                     f"{g.detail}" for g in bad)
