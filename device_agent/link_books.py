"""The link's bookkeeping, pure (no I/O, no clock of its own) so it can be tested alone: which outbox rows each
unacknowledged message carries (``InFlight``), and how fast summaries may leave (``Pace``)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["InFlight", "Pace"]


class InFlight:
    """Bookkeeping of unacknowledged messages: mid -> outbox row ids, and how far the queue was sent.

    Pure (no I/O) so it can be tested alone. ``reset()`` on every lost connection: the rows stay in the
    outbox and are sent again from the start.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("in-flight limit must be at least 1")
        self.limit = limit
        self._rows: dict[int, tuple[int, ...]] = {}
        self.last_row_id = 0  # rows with a larger id have not been sent on this connection

    def __len__(self) -> int:
        return len(self._rows)

    def room(self) -> int:
        return self.limit - len(self._rows)

    def add(self, mid: int, row_ids: Iterable[int]) -> None:
        ids = tuple(row_ids)
        if not ids:
            raise ValueError("a message must carry at least one row")
        if mid in self._rows:
            raise ValueError(f"message id {mid} is already in flight")
        if len(self._rows) >= self.limit:
            raise ValueError(f"already {self.limit} messages in flight")
        self._rows[mid] = ids
        self.last_row_id = max(self.last_row_id, *ids)

    def ack(self, mid: int) -> tuple[int, ...]:
        """Row ids carried by ``mid``; () for a mid we do not track (a heartbeat, or one from before a reset)."""
        return self._rows.pop(mid, ())

    def reset(self) -> None:
        self._rows.clear()
        self.last_row_id = 0


class Pace:
    """A token bucket over summaries sent: at most ``per_minute`` a minute, in bursts of up to ``per_minute``.

    The fleet server refuses a device's summaries past its own rate (``device_rate_per_minute``, 600 by
    default, bursts of 600): quarantined first, then dropped. A device catching up after days offline would
    hit that with a backlog of thousands, so the link paces itself below it (480 by default). 0: no pacing.
    """

    def __init__(self, per_minute: int, now: float) -> None:
        if per_minute < 0:
            raise ValueError("per_minute must be 0 (no pacing) or more")
        self.per_minute = per_minute
        self._tokens = float(per_minute)
        self._at = now

    def allowed(self, now: float) -> int:
        """How many summaries may go now (a large number when pacing is off)."""
        if not self.per_minute:
            return 1 << 30
        self._tokens = min(float(self.per_minute), self._tokens + (now - self._at) * self.per_minute / 60.0)
        self._at = now
        return int(self._tokens)

    def take(self, n: int, now: float) -> None:
        if self.per_minute:
            self.allowed(now)
            self._tokens -= n

    def wait(self, now: float) -> float:
        """Seconds until one more summary may go."""
        if not self.per_minute:
            return 0.0
        return max(0.0, (1.0 - self.allowed(now)) * 60.0 / self.per_minute)
