"""The receiving half: one message of the retained ``…/desired`` topic decided and the decision persisted in
``desired.json`` (atomic). Fast and without network: it runs on the MQTT link's thread.

* the payload is parsed with the untrusted-JSON parser, then ``accept_desired`` checks it with the pinned
  ``keys/fleet.pub``, this device's id, the last accepted ``seq`` and ``now = max(wall clock, trust-store
  high-water)``; then the version policy (``check_move``): the same model name moves forward, or back only to the
  version held in the standby slot (a different model name is allowed, as for ``device-agent install``);
* a **rejection** (bad or unknown signature, replay, expired, another device, a version it may not move to,
  unreadable JSON) is recorded as ``last_rejection`` with its reason token and message, and changes nothing
  else: not the last accepted seq, not the slots, not the trust store;
* the **same** document as the one already accepted (the broker re-delivers the retained message on every
  reconnect) is a ``duplicate``: no rejection, no change; it only wakes the worker;
* an **accepted** one becomes ``accepted`` (the envelope verbatim) with ``last_seq``, and wakes the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet_contracts.canonical import canonical_bytes, parse_json
from edgefleet_contracts.desired import Desired, accept_desired
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.timeutil import fmt
from edgefleet_contracts.versions import is_newer

from ..config import DeviceDir
from ..errors import AgentError
from ..slots import Slots
from ..trust_store import TrustStore
from .record import DesiredFileError, DesiredRecord


class VersionNotAllowedError(AgentError):
    """The desired version is older than the active one and not the one held in standby."""

    reason = "version_not_allowed"


def check_move(d: Desired, active: Manifest | None, standby: Manifest | None) -> None:
    """May this device move to ``d``? Raises VersionNotAllowedError when not (see the module docstring)."""
    if active is None or d.name != active.name or d.version == active.version or is_newer(d.version, active.version):
        return
    if standby is not None and (standby.name, standby.version) == (d.name, d.version):
        return
    held = f"{standby.name} {standby.version}" if standby is not None else "nothing"
    raise VersionNotAllowedError(
        f"desired {d.name} {d.version} is older than the active {active.version} and is not the version held in "
        f"standby ({held}); a device moves back only to the version it holds")


@dataclass(frozen=True)
class Decision:
    kind: str  # "accepted" | "rejected" | "duplicate" | "ignored"
    reason: str
    message: str
    seq: int | None = None


def decide(payload: bytes, device: DeviceDir, path: Path, device_id: str, clock: Callable[[], datetime]) -> Decision:
    """Decide on one non-empty desired-state message and persist the decision in ``path`` (``desired.json``);
    the caller holds the record's lock. Never raises for a bad message: the rejection is recorded and returned."""
    env: Any = None
    try:
        rec = DesiredRecord.load(path)
    except DesiredFileError as exc:
        return Decision("rejected", exc.reason, str(exc))
    try:
        env = parse_json(payload, what="desired state")
        if rec.accepted is not None and isinstance(env, dict) and _same(env.get("signed"), rec.accepted["signed"]):
            return Decision("duplicate", "duplicate", f"seq {rec.last_seq} again (already accepted)", rec.last_seq)
        trust = TrustStore(device, clock=clock)
        d = accept_desired(env, trust.fleet, device_id=device_id, last_seq=rec.last_seq, now=trust.now())
        slots = Slots(device)
        active, standby = slots.active(), slots.standby()
        check_move(d, active[1] if active else None, standby[1] if standby else None)
    except (ContractError, AgentError) as exc:
        seq = _seq_of(env)
        rec.last_rejection = {"at": fmt(clock()), "seq": seq, "reason": exc.reason, "message": str(exc)}
        rec.save(path)
        return Decision("rejected", exc.reason, str(exc), seq)
    rec.last_seq, rec.accepted, rec.accepted_at, rec.outcome = d.seq, env, fmt(clock()), None
    rec.save(path)
    return Decision("accepted", "accepted", f"seq {d.seq}: {d.name} {d.version}"
                    + (f" ({d.reason})" if d.reason else ""), d.seq)


def _same(a: Any, b: Any) -> bool:
    try:
        return canonical_bytes(a) == canonical_bytes(b)
    except ContractError:
        return False


def _seq_of(env: Any) -> int | None:
    if isinstance(env, dict) and isinstance(env.get("signed"), dict):
        seq = env["signed"].get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            return seq
    return None
