"""The updater's own refusals; each carries a ``reason`` token recorded in the result (the package's contract
failures are ContractErrors from :mod:`edgefleet_contracts`)."""

from __future__ import annotations

from typing import Any

from ..errors import AgentError


class UpdateError(AgentError):
    """Root of the updater's own refusals (the package's contract failures are ContractErrors)."""

    reason = "update"


class NotNewerError(UpdateError):
    """The package's version is not newer than the active one of the same model name."""

    reason = "not_newer"


class ReservedNameError(UpdateError):
    """The package lists a file under a name the agent reserves inside a slot."""

    reason = "reserved_name"


class SmokeTestError(UpdateError):
    """The staged model does not reproduce its golden outputs on this device (numbers in the message)."""

    reason = "smoke_test_failed"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class NoStandbyError(UpdateError):
    """Rollback asked for, but the other slot holds no ready (complete, smoke-tested) model."""

    reason = "no_standby"


class StandbyNotOlderError(UpdateError):
    """Rollback asked for, but the standby slot holds a newer model than the active one (the active one was
    rolled back to already): a rollback only goes back."""

    reason = "standby_not_older"


class IllegalTransitionError(UpdateError):
    """A transition outside ``TRANSITIONS`` (a bug, never a user error)."""

    reason = "illegal_transition"


class WrongPackageError(UpdateError):
    """The downloaded package holds another model name or version than the desired state asked for."""

    reason = "wrong_package"


class InProbationError(UpdateError):
    """An install was asked for while the active version is still on probation."""

    reason = "in_probation"


class DeferredError(UpdateError):
    """``before_activate`` postponed the swap (maintenance window closed, a batch running); try again later.

    ``reason`` is the token of the cause (``maintenance_window``, ``busy``)."""

    reason = "deferred"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

