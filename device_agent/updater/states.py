"""The update state machine over plain data: the states, the legal transitions, the result of an operation and
the persisted record (``update.json``).

``update.json`` holds the current state, why it was entered, the candidate, ``last_result`` and a short
history (the last ``HISTORY_LENGTH`` transitions). ``Updater._enter`` persists entry to a state atomically
before anything is done in it, so a restart resumes (or recovers) from the persisted state.

Test hook (failpoint): when the environment variable ``EDGEFLEET_FAILPOINT`` equals the name of a state, the
process SIGKILLs itself right after persisting entry to that state (:func:`failpoint`). The crash tests use it
to prove that a kill at any point leaves a device that serves exactly the old or the new model. Never set it
in production.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import IllegalTransitionError, UpdateError

FAILPOINT_ENV = "EDGEFLEET_FAILPOINT"
HISTORY_LENGTH = 20


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TEST = "smoke_test"
    ACTIVATING = "activating"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"


S = UpdateState
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    S.IDLE: frozenset({S.DOWNLOADING, S.VERIFYING, S.ROLLING_BACK, S.ACTIVATING}),
    S.DOWNLOADING: frozenset({S.VERIFYING, S.IDLE}),
    S.VERIFYING: frozenset({S.STAGING, S.IDLE}),
    S.STAGING: frozenset({S.SMOKE_TEST, S.IDLE}),
    S.SMOKE_TEST: frozenset({S.ACTIVATING, S.IDLE}),
    S.ACTIVATING: frozenset({S.PROBATION, S.IDLE}),
    S.PROBATION: frozenset({S.IDLE, S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.IDLE}),
}


def check_transition(current: UpdateState, new: UpdateState) -> None:
    """Raises IllegalTransitionError when ``current -> new`` is not in ``TRANSITIONS``."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current]))
        raise IllegalTransitionError(f"update state {current} cannot go to {new} (allowed: {allowed})")


OK_STATUSES = frozenset({"installed", "probation", "committed", "rolled_back", "switched"})


@dataclass(frozen=True)
class InstallResult:
    """The outcome of one install or rollback; stored as ``last_result`` in update.json."""

    # "installed" | "probation" (activated, being watched) | "committed" | "rejected" | "failed" | "deferred"
    # | "rolled_back" (to an older version) | "rollback_failed" | "switched" (forward to the standby slot's newer
    # version, without probation: ``Updater.activate_standby`` called without one)
    # name/version/slot: what the operation installed, or for a rollback what the device switched to; a rollback's
    # details["from"] = {"name", "version"} names the version rolled back (rollback_failed: still serving it).
    status: str
    reason: str  # machine-readable token: "installed", "not_newer", "bad_signature", "probation_latency", …
    message: str
    at: str
    name: str | None = None
    version: str | None = None
    slot: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # the package file installed from (name/version are None when it never verified)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UpdateRecord:
    """update.json: the state the updater is in, why, what it is working on, and the last result."""

    state: UpdateState = UpdateState.IDLE
    entered: str = ""
    reason: str = "never updated"
    package: str | None = None
    candidate: dict[str, Any] | None = None
    last_result: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["state"] = str(self.state)
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> UpdateRecord:
        """The record on disk (a fresh one when absent). Raises UpdateError when it is unreadable."""
        try:
            d = json.loads(path.read_bytes())
            rec = cls(
                state=UpdateState(d["state"]), entered=str(d.get("entered", "")), reason=str(d.get("reason", "")),
                package=d.get("package"), candidate=d.get("candidate"), last_result=d.get("last_result"),
                history=list(d.get("history", []))[-HISTORY_LENGTH:],
            )
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UpdateError(f"{path} is unreadable ({exc!r})") from None
        wrong = [name for name, value, kind in (("package", rec.package, str), ("candidate", rec.candidate, dict),
                                                ("last_result", rec.last_result, dict))
                 if value is not None and not isinstance(value, kind)]
        if wrong or not all(isinstance(h, dict) for h in rec.history):
            raise UpdateError(f"{path} is unreadable (wrong type for {', '.join(wrong) or 'history'})")
        return rec


def failpoint(state: UpdateState) -> None:
    """Test hook: SIGKILL this process right after entering ``state`` when EDGEFLEET_FAILPOINT names it."""
    if os.environ.get(FAILPOINT_ENV) == str(state):
        os.kill(os.getpid(), signal.SIGKILL)
