"""UTC timestamps on the wire: ISO 8601 with a trailing Z, second precision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .errors import SchemaError


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: object, field: str) -> datetime:
    """Parse a wire timestamp; SchemaError naming ``field`` when it is not one."""
    if not isinstance(text, str):
        raise SchemaError(f"{field} must be an ISO 8601 UTC timestamp string, got {type(text).__name__}")
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SchemaError(f"{field} is not an ISO 8601 timestamp: {text!r}") from exc
    if t.tzinfo is None:
        raise SchemaError(f"{field} has no time zone: {text!r}")
    return t.astimezone(UTC)


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '10m', '45s' -> timedelta. Raises SchemaError on anything else."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    t = text.strip()
    if len(t) < 2 or t[-1] not in units or not t[:-1].isdigit():
        raise SchemaError(f"duration {text!r} must be a whole number followed by d, h, m or s (e.g. 30d)")
    return timedelta(seconds=int(t[:-1]) * units[t[-1]])
