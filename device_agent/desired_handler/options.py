"""The handler's options: the maintenance window and the rollout keys of ``config.toml`` (``HandlerOptions``).
Nothing here is global; the options are built once and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgefleet_contracts.timeutil import DailyWindow

from ..download import DownloadOptions
from ..probation import ProbationPolicy

MaintenanceWindow = DailyWindow  # the device's name for it (config key ``maintenance_window``)


@dataclass(frozen=True)
class HandlerOptions:
    policy: ProbationPolicy | None = None  # None: from config.toml (probation_seconds, probation_predictions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    window: MaintenanceWindow | None = None
    busy_timeout: float = 300.0  # wait this long for a running batch to end before deferring the swap
    retry_initial: float = 1.0
    retry_max: float = 60.0
    poll: float = 0.5  # probation watch interval (the files it checks: at most once a second; see ``watch``)

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

