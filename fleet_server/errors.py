"""Fleet server errors: one root, names ending in Error; the HTTP layer maps them to status codes in one place."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence


class FleetError(Exception):
    """Root of every error the fleet server raises on purpose."""

    status = 400
    reason = "fleet"


class ConfigError(FleetError):
    reason = "config"


class AuthError(FleetError):
    """Missing, unknown, expired or revoked bearer token."""

    status = 401
    reason = "unauthenticated"


class ForbiddenError(FleetError):
    """The token's role may not do this."""

    status = 403
    reason = "forbidden"


class NotFoundError(FleetError):
    status = 404
    reason = "not_found"


class ConflictError(FleetError):
    status = 409
    reason = "conflict"


class RequestError(FleetError):
    """A request body or parameter is invalid (the message names it)."""

    status = 422
    reason = "invalid_request"


class TooLargeError(FleetError):
    """A request body is over the server's limit."""

    status = 413
    reason = "too_large"


class RejectedError(FleetError):
    """A device message was rejected (quarantined with this reason)."""

    status = 422

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def did_you_mean(word: str, known: Sequence[str],
                 nearest: Callable[[str, Sequence[str]], list[str]] | None = None) -> str:
    """`` (did you mean bake_seconds?)`` for the known name ``word`` most likely meant, or "" when none is close.
    ``nearest`` picks it (default: the closest spelling)."""
    picked = (nearest or (lambda w, choices: difflib.get_close_matches(w, choices, 1)))(word, known)
    return f" (did you mean {picked[0]}?)" if picked else ""


def named_unknown(unknown: Iterable[str], known: Sequence[str],
                  nearest: Callable[[str, Sequence[str]], list[str]] | None = None) -> str:
    """Unknown names as an error lists them, each with :func:`did_you_mean`: ``bake (did you mean
    bake_seconds?), colour``."""
    return ", ".join(k + did_you_mean(k, known, nearest) for k in unknown)
