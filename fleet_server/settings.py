"""Typed server settings, validated once at start-up and passed in (no globals, nothing read at import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edgefleet_contracts.topics import check_id

from .errors import ConfigError


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

    def base_url(self) -> str:
        return self.public_url or f"http://{self.http_host}:{self.http_port}"

    def broker_url(self) -> str:
        if self.broker == "embedded":
            return f"mqtt://{self.embedded_mqtt_host}:{self.embedded_mqtt_port}"
        return self.broker
