"""The device's reported state (what it actually runs): published retained on ``…/report``, signed.

The device is the authority on what it runs; the server stores the latest report per device (by ``at``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _fields as f
from .errors import SchemaError
from .timeutil import parse
from .topics import check_id

REPORT_TYPE = "edgefleet.report"
REPORT_SPEC = 1


MAX_TARGET_CHARS = 128


def _target(v: Any) -> str:
    """``report.target``: a target profile's name (any name a target file may have), "" when absent."""
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > MAX_TARGET_CHARS or not v.isprintable():
        raise SchemaError(f"report.target must be a target name of at most {MAX_TARGET_CHARS} printable characters")
    return v


@dataclass
class Report:
    device_id: str
    at: str
    active: dict[str, str] | None  # {"name", "version"}
    standby: dict[str, str] | None
    update_state: str
    last_result: dict[str, Any] | None  # {"status", "reason", "version", "at", ...}
    agent_version: str = ""
    desired_seq: int = 0  # the last desired-state sequence number the device accepted (issue 5)
    # What became of that desired state so far: {"seq", "status", "reason", "message", "at"} (status e.g.
    # "deferred" with reason "maintenance_window", "installed", "failed"), so that an operator sees why a device
    # has not moved yet; None when the device holds none. Optional in the contract: older agents omit it.
    desired_outcome: dict[str, Any] | None = None
    # The target profile the device runs (``rpi4-aarch64``): it installs only packages built for it, so the server
    # refuses to send it another target's package. Optional: older agents omit it ("" unknown).
    target: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": REPORT_TYPE, "spec": REPORT_SPEC, "device_id": self.device_id, "at": self.at,
                "active": self.active, "standby": self.standby, "update_state": self.update_state,
                "last_result": self.last_result, "agent_version": self.agent_version,
                "desired_seq": self.desired_seq, "desired_outcome": self.desired_outcome, "target": self.target}

    @classmethod
    def from_dict(cls, d: Any) -> Report:
        """Raises SchemaError naming the bad field."""
        d = f.obj(d, "report")
        f.const(d, "type", REPORT_TYPE, "report")
        f.const(d, "spec", REPORT_SPEC, "report")
        at = f.string(d, "at", "report")
        parse(at, "report.at")
        slots = []
        for k in ("active", "standby"):
            v = d.get(k)
            if v is not None:
                v = f.obj(v, f"report.{k}")
                f.string(v, "name", f"report.{k}")
                f.string(v, "version", f"report.{k}")
            slots.append(v)
        lr = d.get("last_result")
        if lr is not None and not isinstance(lr, dict):
            raise SchemaError("report.last_result must be an object or null")
        outcome = d.get("desired_outcome")
        if outcome is not None:
            outcome = f.obj(outcome, "report.desired_outcome")
            for k in ("status", "reason", "message", "at"):
                if outcome.get(k) is not None and not isinstance(outcome[k], str):
                    raise SchemaError(f"report.desired_outcome.{k} must be a string or null")
            if outcome.get("seq") is not None:
                f.integer(outcome, "seq", "report.desired_outcome", minimum=0)
            outcome = {k: outcome.get(k) for k in ("seq", "status", "reason", "message", "at")
                       if outcome.get(k) is not None}
        return cls(check_id(f.string(d, "device_id", "report"), "report.device_id"), at, slots[0], slots[1],
                   f.string(d, "update_state", "report"), lr, str(d.get("agent_version", "")),
                   f.integer(d, "desired_seq", "report", minimum=0) if "desired_seq" in d else 0, outcome,
                   _target(d.get("target")))
