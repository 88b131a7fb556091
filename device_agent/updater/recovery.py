"""Start-up repair (``Updater.recover()``, run at every start-up under the update lock).

It discards staging/trash folders and incomplete slots, makes sure the pointer names a ready slot (else the
other ready slot, else no model), and then, by the state it finds in ``update.json``:

* ``probation`` with the candidate still active: left as it is. The watch is resumed by the desired-state
  handler of the running agent (``device_agent.desired_handler``), which counts the restarts and rolls back
  when the agent keeps dying during probation. ``recover`` never starts network work or a watch itself.
* ``rolling_back`` that came from probation: the rollback is completed (an atomic pointer write to the slot it
  named, if still ready) or reported as ``rollback_failed``: a version that failed probation must not keep
  serving because the agent was killed mid-rollback.
* any other non-idle state (``downloading`` included): recorded as ``failed`` (``interrupted during
  <state>``). A partial download stays in ``downloads/`` so the handler resumes it with a Range request when
  the desired state still asks for it; an interrupted install is redone from the complete file.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..slots import SLOT_NAMES, SlotError
from .errors import UpdateError
from .states import InstallResult, UpdateRecord, UpdateState

if TYPE_CHECKING:
    from .machine import Updater

log = logging.getLogger("device_agent.updater")  # the updater's one logger (the module docstring names it)
S = UpdateState


def recover_locked(up: Updater) -> list[str]:
    """The repair itself (see the module docstring); returns what it did. The caller holds the update lock."""
    actions: list[str] = []
    for p in up.slots.leftovers():
        if p.is_dir():
            up.slots.discard(p)
        else:
            p.unlink()
        actions.append(f"discarded leftover {p.name}")
    for s in SLOT_NAMES:
        folder = up.slots.path(s)
        if folder.exists() and not up.slots.is_ready(s):
            up.slots.discard(folder)
            actions.append(f"discarded incomplete slot {s}")
    actions += _repair_pointer(up)
    try:
        rec = up.record()
        interrupted = None if rec.state == UpdateState.IDLE else str(rec.state)
    except UpdateError as exc:
        rec, interrupted = UpdateRecord(), f"an unknown state ({exc})"
    cand = rec.candidate or {}
    if rec.state == S.PROBATION and _candidate_active(up, cand):
        interrupted = None  # the watch resumes in the running agent (desired_handler)
    elif rec.state == S.ROLLING_BACK and (cand.get("rollback") or {}).get("from_probation"):
        actions.append(_finish_interrupted_rollback(up, rec, cand))
        interrupted = None
    if interrupted is not None:
        serving = up.slots.active()
        now = f"; serving {serving[1].name} {serving[1].version}" if serving else "; no model active"
        result = InstallResult("failed", "interrupted", f"interrupted during {interrupted}{now}", up._now(),
                               cand.get("name"), cand.get("version"), cand.get("slot"))
        up._save_idle(rec, result, f"recovered: interrupted during {interrupted}")
        actions.append(f"recorded the operation interrupted during {interrupted} as failed")
    for a in actions:
        log.warning("recover: %s", a)
    return actions

def _candidate_active(up: Updater, cand: dict[str, Any]) -> bool:
    active = up.slots.active()
    return active is not None and (active[0].name, active[1].name, active[1].version) == (
        cand.get("slot"), cand.get("name"), cand.get("version"))

def _finish_interrupted_rollback(up: Updater, rec: UpdateRecord, cand: dict[str, Any]) -> str:
    """A rollback out of probation was killed midway: complete it (the pointer write is atomic)."""
    rb = cand.get("rollback") or {}
    reason, why = str(rb.get("reason", "probation_failed")), str(rb.get("message", ""))
    slot = str(cand.get("slot"))
    m = up.slots.manifest(slot) if slot in SLOT_NAMES and up.slots.is_ready(slot) else None
    prefix = f"{why}; " if why else ""
    if m is None or (m.name, m.version) != (cand.get("name"), cand.get("version")):
        result = InstallResult("rollback_failed", "no_standby", f"{prefix}the rollback was interrupted and slot "
                               f"{slot} no longer holds {cand.get('name')} {cand.get('version')}", up._now(),
                               details={"rollback_reason": reason})
        up._save_idle(rec, result, "recovered: rollback out of probation could not be completed")
        return "a rollback out of probation could not be completed"
    if up.slots.active_name() != slot:
        up.slots.set_pointer(slot, m, up.clock())
    result = InstallResult("rolled_back", reason, f"{prefix}rolled back from {rb.get('from')} to {m.name} "
                           f"{m.version} (slot {slot}; completed after a restart)", up._now(), m.name,
                           m.version, slot, dict(rb.get("details") or {}))  # details carry "from"
    up._save_idle(rec, result, "recovered: completed the rollback out of probation")
    return f"completed the rollback out of probation to {m.name} {m.version}"

def _repair_pointer(up: Updater) -> list[str]:
    try:
        p = up.slots.pointer()
    except SlotError as exc:
        p, broken = None, str(exc)
    else:
        if p is None:
            return []
        broken = f"active.json names slot {p.slot} ({p.name} {p.version}), which is not a ready slot"
    if p is not None and up.slots.active_name() == p.slot:
        return []
    fallback = [s for s in SLOT_NAMES if (p is None or s != p.slot) and up.slots.is_ready(s)]
    if fallback:
        m = up.slots.manifest(fallback[0])
        assert m is not None
        up.slots.set_pointer(fallback[0], m, up.clock())
        return [f"{broken}; fell back to slot {fallback[0]} ({m.name} {m.version})"]
    up.slots.clear_pointer()
    return [f"{broken}; no ready slot left, so no model is active"]
