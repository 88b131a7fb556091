"""The handler's options: the maintenance window and the rollout keys of ``config.toml`` (``HandlerOptions``).
Nothing here is global; the options are built once and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from typing import Any

from ..download import DownloadOptions
from ..probation import ProbationPolicy


@dataclass(frozen=True)
class MaintenanceWindow:
    """A daily UTC window ``HH:MM-HH:MM`` (may wrap midnight) in which a model may be swapped."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        """Raises ValueError for anything but ``HH:MM-HH:MM`` with different ends."""
        try:
            a, b = (dtime.fromisoformat(p.strip()) for p in text.split("-"))
        except ValueError:
            raise ValueError(f"maintenance window {text!r} must look like 02:00-04:00 (UTC)") from None
        if a == b:
            raise ValueError(f"maintenance window {text!r} is empty")
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


@dataclass(frozen=True)
class HandlerOptions:
    policy: ProbationPolicy | None = None  # None: from config.toml (probation_seconds, probation_predictions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    window: MaintenanceWindow | None = None
    busy_timeout: float = 300.0  # wait this long for a running batch to end before deferring the swap
    retry_initial: float = 1.0
    retry_max: float = 60.0
    poll: float = 0.1  # probation watch interval

    @classmethod
    def from_config(cls, cfg: Any) -> HandlerOptions:
        """Read the rollout keys of config.toml when it has them (``maintenance_window``, ``download_rate_limit``,
        ``download_read_timeout``, ``busy_defer_seconds``); defaults otherwise."""
        window = str(getattr(cfg, "maintenance_window", "") or "")
        rate = float(getattr(cfg, "download_rate_limit", 0) or 0)
        return cls(policy=ProbationPolicy.from_config(cfg),
                   download=DownloadOptions(rate_limit=rate or None,
                                            read_timeout=float(getattr(cfg, "download_read_timeout", 30.0))),
                   window=MaintenanceWindow.parse(window) if window else None,
                   busy_timeout=float(getattr(cfg, "busy_defer_seconds", 300.0)))

