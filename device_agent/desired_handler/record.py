"""``desired.json``: the newest accepted desired state (the signed envelope, verbatim), the last rejection and
the outcome for the accepted seq. Written atomically; an unreadable file makes the device refuse every desired
state (it cannot tell a replay) until it is repaired or removed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.desired import Desired
from edgefleet_contracts.errors import ContractError

from ..config import DeviceDir
from ..errors import AgentError

DESIRED_FILE = "desired.json"
DESIRED_SPEC = 1


class DesiredFileError(AgentError):
    """desired.json cannot be read: the device cannot tell a replay, so it refuses every desired state."""

    reason = "desired_store"


@dataclass
class DesiredRecord:
    """desired.json: the newest accepted desired state, the last rejection, the outcome for the accepted seq."""

    last_seq: int = 0
    accepted: dict[str, Any] | None = None  # the accepted envelope, verbatim
    accepted_at: str | None = None
    last_rejection: dict[str, Any] | None = None  # {"at", "seq", "reason", "message"}
    outcome: dict[str, Any] | None = None  # {"seq", "status", "reason", "message", "at", "final", "attempts"}

    def desired(self) -> Desired | None:
        if self.accepted is None:
            return None
        return Desired.from_signed(self.accepted.get("signed"))

    def to_json(self) -> str:
        return json.dumps({"spec": DESIRED_SPEC, **asdict(self)}, indent=1, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        """Replace ``path`` atomically with this record."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> DesiredRecord:
        """A fresh record when absent. Raises DesiredFileError when unreadable."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise DesiredFileError(f"cannot read {path}: {exc}") from None
        try:
            d = parse_json(data, what=str(path))
            if not isinstance(d, dict) or d.get("spec") != DESIRED_SPEC:
                raise DesiredFileError(f"{path} is not a desired-state record (spec {DESIRED_SPEC})")
            seq = d.get("last_seq")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise DesiredFileError(f"{path}: last_seq must be a whole number")
            return cls(seq, d.get("accepted"), d.get("accepted_at"), d.get("last_rejection"), d.get("outcome"))
        except ContractError as exc:
            raise DesiredFileError(f"{path} is unreadable ({exc}); the device refuses desired states until it is "
                                   "repaired or removed") from None


def read_desired_seq(device: DeviceDir) -> int:
    """The last accepted desired-state seq (0 when none, or when desired.json is unreadable)."""
    return read_desired_state(device)[0]


def read_desired_state(device: DeviceDir) -> tuple[int, dict[str, Any] | None]:
    """For the report, from one read of desired.json: the last accepted seq and what became of that desired state
    (``seq``, ``status``, ``reason``, ``message``, ``at``; None when none). (0, None) when it is unreadable."""
    try:
        rec = DesiredRecord.load(device.path / DESIRED_FILE)
    except DesiredFileError:
        return 0, None
    outcome = rec.outcome if isinstance(rec.outcome, dict) else None
    if outcome is not None:
        outcome = {k: outcome[k] for k in ("seq", "status", "reason", "message", "at") if outcome.get(k) is not None}
    return rec.last_seq, outcome
