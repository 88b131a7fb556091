"""Per-device token buckets: a device flooding summaries is refused (``rate_limited``), others are not slowed.

What happens to a summary over its device's rate (decided here, documented in the package docstring): it is
acknowledged (MQTT) or answered 429/``rate_limited`` (HTTP) and quarantined whole with reason
``rate_limited``, so an operator can see it and replay it, while the device's *quarantine allowance* (a second
bucket, ``settings.rate_limited_quarantine_per_minute``) lasts; past that it is acknowledged and dropped,
counted in ``edgefleet_ingest_dropped_total{reason="rate_limited"}``, so that a flood cannot fill the disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class _Buckets:
    """Token buckets by device: ``per_minute`` tokens a minute, bursts of up to ``per_minute`` (0: none ever).
    Not locked: the RateLimiter holds its lock around every call."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._levels: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def level(self, device_id: str, now: float) -> float:
        tokens, at = self._levels.get(device_id, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def take(self, device_id: str, now: float) -> tuple[bool, float]:
        """(taken, seconds until one token is there again when not taken)."""
        tokens = self.level(device_id, now)
        if tokens < 1.0:
            self._levels[device_id] = (tokens, now)
            return False, ((1.0 - tokens) / self.rate if self.rate else float("inf"))
        self._levels[device_id] = (tokens - 1.0, now)
        return True, 0.0


class RateLimiter:
    """One token bucket per device for summaries (``per_minute``) and one for quarantining the summaries
    refused by it (``quarantine_per_minute``, default the same).

    Thread-safe; O(1) per call. ``monotonic`` is injectable for tests.
    """

    def __init__(self, per_minute: int, *, quarantine_per_minute: int | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("device_rate_per_minute must be at least 1")
        spill = per_minute if quarantine_per_minute is None else quarantine_per_minute
        if spill < 0:
            raise ValueError("rate_limited_quarantine_per_minute must be 0 or more")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._monotonic = monotonic
        self._tokens = _Buckets(per_minute)
        self._spill = _Buckets(spill)
        self._empty_until: dict[str, float] = {}  # refused devices -> when they have a token again
        self._lock = threading.Lock()

    def over_rate(self) -> frozenset[str]:
        """Devices refused a token whose bucket has not refilled to one token yet (takes none).

        A snapshot small enough to hand to a validator process with each message."""
        with self._lock:
            now = self._monotonic()
            for d in [d for d, until in self._empty_until.items() if until <= now]:
                del self._empty_until[d]
            return frozenset(self._empty_until)

    def take(self, device_id: str) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        with self._lock:
            now = self._monotonic()
            taken, wait = self._tokens.take(device_id, now)
            if not taken:
                self._empty_until[device_id] = now + wait
            return taken

    def quarantine(self, device_id: str) -> bool:
        """Whether one more rate-limited summary of the device is quarantined (True) or only dropped and
        counted (False): takes a token of the device's quarantine allowance."""
        with self._lock:
            return self._spill.take(device_id, self._monotonic())[0]
