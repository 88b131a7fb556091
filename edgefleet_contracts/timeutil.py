"""UTC timestamps on the wire: ISO 8601 with a trailing Z, second precision."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as dtime

from .errors import SchemaError


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def fmt(t: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC (the year zero-padded: glibc's ``%Y`` writes year 1 as ``1``)."""
    u = t.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}Z"


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
    try:
        return t.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before the first representable instant
        raise SchemaError(f"{field} is outside the representable range once converted to UTC: {text!r}") from None


MAX_DURATION_S = 100 * 366 * 86400  # a century: past it a duration is a typo (and past timedelta, a crash)


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '10m', '45s' -> timedelta, at most a century. Raises SchemaError on anything else."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    t = text.strip()
    if len(t) < 2 or t[-1] not in units or not t[:-1].isascii() or not t[:-1].isdigit():
        raise SchemaError(f"duration {text!r} must be a whole number followed by d, h, m or s (e.g. 30d)")
    seconds = int(t[:-1]) * units[t[-1]]
    if seconds > MAX_DURATION_S:
        raise SchemaError(f"duration {text!r} is longer than a century ({MAX_DURATION_S // 86400:,}d)")
    return timedelta(seconds=seconds)


def duration_text(seconds: float) -> str:
    """A duration in the largest whole unit that fits it, for people: ``30 days``, ``12 hours``, ``1 minute``,
    ``4 seconds`` (``1.5 seconds`` when not whole)."""
    if not float(seconds).is_integer():
        return f"{seconds:g} seconds"
    s = int(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s and s % size == 0:
            n = s // size
            return f"{n:,} {unit}{'' if n == 1 else 's'}"
    return f"{s:,} second{'' if s == 1 else 's'}"


@dataclass(frozen=True)
class DailyWindow:
    """A daily UTC window ``HH:MM-HH:MM`` (may wrap midnight): a device's maintenance window, a rollout's
    ``--window``. One definition for both sides."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> DailyWindow:
        """Raises ValueError for anything but ``HH:MM-HH:MM`` with different ends."""
        try:
            a, b = (dtime.fromisoformat(p.strip()) for p in text.split("-"))
        except ValueError:
            raise ValueError(f"window {text!r} must look like 02:00-04:00 (UTC)") from None
        if a == b:
            raise ValueError(f"window {text!r} is empty")
        return cls(a, b)

    def is_open(self, now: datetime) -> bool:
        t = now.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def seconds_until_open(self, now: datetime) -> float:
        if self.is_open(now):
            return 0.0
        t = now.time().replace(tzinfo=None)
        secs = (self.start.hour * 3600 + self.start.minute * 60) - (t.hour * 3600 + t.minute * 60 + t.second)
        return float(secs % 86400)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} UTC"
