"""Typed server settings, validated once at start-up and passed in (no globals, nothing read at import)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edgefleet_contracts.topics import check_id

from .errors import ConfigError

# The longest window the server reads summaries over by default: alert evaluation (``AlertRules.window_s``) and
# the drift report's and dashboard's default range (``health.DEFAULT_LOOKBACK_S``), one day each (a test pins
# this against both). A shorter retention would empty them, so it is refused. Longer windows set at run time (a
# model's ``window_s``, an active rollout's stage) are protected by the housekeeping pass itself.
MIN_SUMMARY_RETENTION_DAYS = 1.0


# The bounded-storage settings (fleet_server/housekeeping.py): ServerSettings fields, keys of server.toml's
# [storage] table and flags of `serve` and `housekeeping`. Whole numbers with their (inclusive) range:
_WHOLE_STORAGE = {"quarantine_max_rows": (1, 10**9), "quarantine_max_payload_mb": (0, 10**7),
                  "housekeeping_chunk_rows": (1, 10_000)}
STORAGE_SETTINGS = ("quarantine_max_rows", "quarantine_max_payload_mb", "summary_retention_days",
                    "housekeeping_interval_seconds", "housekeeping_chunk_rows")


def storage_rule_broken(name: str, value: object) -> str | None:
    """The rule ``value`` breaks as the bounded-storage setting ``name``, worded to follow "must be" (e.g. "a whole
    number from 1 to 1,000,000,000"), or None when ``value`` is allowed. One rule for the flags, server.toml and
    ServerSettings itself. KeyError when ``name`` is not in STORAGE_SETTINGS."""
    if name in _WHOLE_STORAGE:
        lo, hi = _WHOLE_STORAGE[name]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            return f"a whole number from {lo:,} to {hi:,}"
        return None
    if name not in STORAGE_SETTINGS:
        raise KeyError(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return "a finite number, 0 or more"
    if name == "housekeeping_interval_seconds" and not 0 < value <= 86400:
        return "more than 0 and at most 86400 (one day)"
    if name == "summary_retention_days" and 0 < value < MIN_SUMMARY_RETENTION_DAYS:
        return (f"0 (keep forever) or at least {MIN_SUMMARY_RETENTION_DAYS:g} day: alert evaluation and the drift "
                f"report read the last {MIN_SUMMARY_RETENTION_DAYS:g} day of summaries by default")
    return None


def storage_table(table: object, source: str) -> dict[str, int | float]:
    """The bounded-storage settings a ``[storage]`` table sets (as read from the file ``source``), each checked with
    the rule its flag has. ConfigError naming ``source``, the key and the rule; also for a key that is no storage
    setting (a typo must not fall back to the default unnoticed) and for a ``storage`` that is not a table."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: storage must be a table ([storage]) of {', '.join(STORAGE_SETTINGS)}, "
                          f"not {table!r}")
    unknown = [str(k) for k in table if k not in STORAGE_SETTINGS]
    if unknown:
        named = [k + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(k, STORAGE_SETTINGS, 1))
                 for k in unknown]
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} in [storage]: {', '.join(named)}; "
                          f"the keys are {', '.join(STORAGE_SETTINGS)}")
    out: dict[str, int | float] = {}
    for name, value in table.items():
        rule = storage_rule_broken(name, value)
        if rule is not None:
            unquote = " (a string: write the number without quotes)" if isinstance(value, str) else ""
            raise ConfigError(f"{source}: [storage] {name} must be {rule}, not {value!r}{unquote}")
        out[name] = value if name in _WHOLE_STORAGE else float(value)
    return out


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    fleet: str = "default"
    http_host: str = "127.0.0.1"
    http_port: int = 8480
    broker: str = "embedded"  # "embedded" (amqtt on loopback), "mqtt://host:port", or "none" (HTTP only)
    embedded_mqtt_host: str = "127.0.0.1"
    embedded_mqtt_port: int = 1884
    public_url: str = ""  # how devices reach this server's HTTP (package downloads); default http://host:port
    max_summary_bytes: int = 256 * 1024
    ingest_batch: int = 500  # summaries committed per transaction
    ingest_flush_seconds: float = 0.05
    device_rate_per_minute: int = 600  # summaries per device per minute before rate limiting
    # Summaries refused for the rate that are still quarantined (per device per minute); past that they are
    # acknowledged, dropped and counted (edgefleet_ingest_dropped_total), so a flood cannot fill the disk.
    rate_limited_quarantine_per_minute: int = 600
    drift_interval_seconds: float = 30.0
    rollout_tick_seconds: float = 2.0
    webhook_timeout_seconds: float = 5.0
    webhook_retries: int = 5
    offline_after_seconds: float = 300.0  # the dashboard shows a device offline when not seen for this long
    # Bounded storage (fleet_server/housekeeping.py; README "Storage and retention"). Quarantine: at most this many
    # rows (oldest deleted first) and this many MiB of payloads (past it the oldest rows keep their metadata and
    # lose their payload; 0 keeps no payloads). Summaries: kept this many days after receipt (0 = forever).
    quarantine_max_rows: int = 100_000
    quarantine_max_payload_mb: int = 256
    summary_retention_days: float = 400.0
    housekeeping_interval_seconds: float = 60.0  # between full passes (quarantine caps are also checked each second)
    housekeeping_chunk_rows: int = 500  # rows deleted per write transaction (short, so ingest never waits long)

    def __post_init__(self) -> None:
        try:
            check_id(self.fleet, "fleet")
        except Exception as exc:
            raise ConfigError(str(exc)) from None
        if self.broker not in ("embedded", "none"):
            u = urlparse(self.broker)
            if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
                raise ConfigError(f"--broker {self.broker!r} must be embedded, none or mqtt://host:port")
        for name in ("http_port", "embedded_mqtt_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"{name} must be 0..65535")
        if self.max_summary_bytes < 1024:
            raise ConfigError("max_summary_bytes must be at least 1024")
        if self.ingest_batch < 1:
            raise ConfigError("ingest_batch must be at least 1")
        if self.device_rate_per_minute < 1:
            raise ConfigError("device_rate_per_minute must be at least 1")
        if self.rate_limited_quarantine_per_minute < 0:
            raise ConfigError("rate_limited_quarantine_per_minute must be 0 or more")
        self._storage_checks()

    def _storage_checks(self) -> None:
        """The bounded-storage settings; ConfigError names the setting and its ``serve`` flag."""
        for name in STORAGE_SETTINGS:
            rule = storage_rule_broken(name, getattr(self, name))
            if rule is not None:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} ({flag}) must be {rule}, not {getattr(self, name)!r}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.sqlite"

    @property
    def packages_dir(self) -> Path:
        return self.data_dir / "packages"

    @property
    def root_pub(self) -> Path:
        return self.data_dir / "keys" / "root.pub"

    @property
    def fleet_key(self) -> Path:
        return self.data_dir / "keys" / "fleet.key"

    @property
    def fleet_pub(self) -> Path:
        return self.data_dir / "keys" / "fleet.pub"

    @property
    def quarantine_max_payload_bytes(self) -> int:
        return self.quarantine_max_payload_mb * 1024 * 1024

    @property
    def summary_retention_seconds(self) -> float:
        """0 when summaries are kept forever."""
        return self.summary_retention_days * 86400.0

    def base_url(self) -> str:
        return self.public_url or f"http://{self.http_host}:{self.http_port}"

    def broker_url(self) -> str:
        if self.broker == "embedded":
            return f"mqtt://{self.embedded_mqtt_host}:{self.embedded_mqtt_port}"
        return self.broker
