"""Typed server settings, validated once at start-up and passed in (no globals, nothing read at import).

**Bounded-storage settings** (fleet_server/housekeeping.py) are declared once each, as a ``ServerSettings`` field
made by ``_storage(default, unit, help, rule)``: that one declaration is the field (its annotation the type, its
default the default), the key of server.toml's ``[storage]`` table, the flag of ``serve`` and ``housekeeping``
(the name with dashes; ``unit`` its metavar, ``help`` its help), the rule the field, the key and the flag are all
checked by, and whether ``fleet-server housekeeping`` prints it. :data:`STORAGE` is the table of them
(:class:`StorageSetting`, in declaration order) that the CLI and :func:`storage_table` read. A sixth setting is one
more ``_storage`` field. The table is collected from the fields, rather than the fields generated from a table,
so that ``settings.quarantine_max_rows`` stays a typed attribute mypy checks.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from edgefleet_contracts.topics import check_id

from .errors import ConfigError, named_unknown

__all__ = ["DEFAULT_HTTP", "MAX_SUMMARY_RETENTION_DAYS", "MIN_SUMMARY_RETENTION_DAYS", "STORAGE", "STORAGE_SETTINGS",
           "ServerSettings", "StorageSetting", "check_public_url", "parse_http_address", "storage_rule_broken",
           "storage_table"]

DEFAULT_HTTP = "127.0.0.1:8480"  # where `serve` binds its HTTP API when neither --http nor server.toml's http says

# The longest window the server reads summaries over by default: alert evaluation (``AlertRules.window_s``) and
# the drift report's and dashboard's default range (``health.DEFAULT_LOOKBACK_S``), one day each (a test pins
# this against both). A shorter retention would empty them, so it is refused. Longer windows set at run time (a
# model's ``window_s``, an active rollout's stage) are protected by the housekeeping pass itself.
MIN_SUMMARY_RETENTION_DAYS = 1.0

# The longest retention accepted (100 years): longer is "forever", which is 0.
MAX_SUMMARY_RETENTION_DAYS = 36_600.0

# A storage setting's rule: None when the value is allowed, else what it must be, worded to follow "must be".
Rule = Callable[[object], str | None]
_N = TypeVar("_N", int, float)
_STORAGE = "edgefleet.storage"  # the dataclass field metadata key of a storage setting's declaration


@dataclass(frozen=True)
class StorageSetting:
    """One bounded-storage setting: a ``ServerSettings`` field, a ``[storage]`` key of server.toml and a flag."""

    name: str  # the field and the [storage] key
    kind: type[int] | type[float]  # int or float: the flag's type; a server.toml value is stored as this
    default: int | float
    unit: str  # the flag's metavar
    help: str  # the flag's help, before "(for this run; else [storage] NAME in server.toml, else DEFAULT)"
    rule: Rule = field(repr=False, compare=False)
    per_pass: bool = True  # `fleet-server housekeeping` prints it (False: the interval between passes, serve's alone)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _storage(default: _N, unit: str, help: str, rule: Rule, *, per_pass: bool = True) -> _N:
    """A ``ServerSettings`` field that is a bounded-storage setting (collected into :data:`STORAGE`)."""
    spec = {"unit": unit, "help": help, "rule": rule, "per_pass": per_pass}
    return field(default=default, metadata={_STORAGE: spec})


def _whole(lo: int, hi: int) -> Rule:
    """An int from ``lo`` to ``hi`` inclusive (not a bool, not a float however round)."""
    def rule(value: object) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"a whole number from {lo:,} to {hi:,}"
    return rule


def _finite(also: Callable[[float], str | None] | None = None) -> Rule:
    """A finite int or float, 0 or more (not a bool), that ``also`` allows."""
    def rule(value: object) -> str | None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return "a finite number, 0 or more"
        return also(value) if also is not None else None
    return rule


def _retention(days: float) -> str | None:
    if 0 < days < MIN_SUMMARY_RETENTION_DAYS:
        return (f"0 (keep forever) or at least {MIN_SUMMARY_RETENTION_DAYS:g} day: alert evaluation and the drift "
                f"report read the last {MIN_SUMMARY_RETENTION_DAYS:g} day of summaries by default")
    if days > MAX_SUMMARY_RETENTION_DAYS:  # a cutoff before year 1 is no date: housekeeping could not print it
        return f"0 (keep forever) or at most {MAX_SUMMARY_RETENTION_DAYS:,g} days (100 years)"
    return None


def _interval(seconds: float) -> str | None:
    return None if 0 < seconds <= 86400 else "more than 0 and at most 86400 (one day)"


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
    # Bounded storage (fleet_server/housekeeping.py; README "Storage and retention"), one declaration each: the
    # field, its [storage] key, its `serve`/`housekeeping` flag and its rule (see the module docstring). The
    # quarantine keeps at most this many rows (oldest deleted first) and MiB of payloads (past it the oldest rows
    # keep their metadata and lose their payload); summaries are kept this many days after receipt. Passes run
    # every interval (the quarantine caps are also checked each second), deleting a chunk of rows per short write
    # transaction, so ingest never waits long.
    quarantine_max_rows: int = _storage(
        100_000, "N", "quarantine rows kept; the oldest are deleted past it", _whole(1, 10**9))
    quarantine_max_payload_mb: int = _storage(
        256, "MIB", "MiB of quarantined payloads kept; past it the oldest rows keep only their metadata "
                    "(0 = no payloads)", _whole(0, 10**7))
    summary_retention_days: float = _storage(
        400.0, "DAYS", "days summaries are kept after receipt (0 = forever, else at least 1)", _finite(_retention))
    housekeeping_interval_seconds: float = _storage(
        60.0, "SECONDS", "seconds between housekeeping passes", _finite(_interval), per_pass=False)
    housekeeping_chunk_rows: int = _storage(500, "N", "rows deleted per write transaction", _whole(1, 10_000))

    def __post_init__(self) -> None:
        try:
            check_id(self.fleet, "fleet")
        except Exception as exc:
            raise ConfigError(str(exc)) from None
        if self.broker not in ("embedded", "none"):
            u = urlparse(self.broker)
            if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
                raise ConfigError(f"--broker {self.broker!r} must be embedded, none or mqtt://host:port")
        if self.public_url:
            check_public_url(self.public_url, "public_url")
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
        for s in STORAGE:
            value = getattr(self, s.name)
            rule = s.rule(value)
            if rule is not None:
                raise ConfigError(f"{s.name} ({s.flag}) must be {rule}, not {value!r}")

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
        """The URL devices download packages from (``public_url``, else the HTTP listen address)."""
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return self.public_url.rstrip("/") or f"http://{host}:{self.http_port}"

    def broker_url(self) -> str:
        if self.broker == "embedded":
            return f"mqtt://{self.embedded_mqtt_host}:{self.embedded_mqtt_port}"
        return self.broker


def parse_http_address(text: object, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``--http``, server.toml's ``http``) as (host, port); ``[::1]:8480`` for an IPv6 host.
    ConfigError naming ``what`` when it is not a string of that form with a port 0..65535."""
    host, sep, port = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not (sep and host and port.isascii() and port.isdigit() and int(port) < 65536):
        raise ConfigError(f"{what} must be a quoted HOST:PORT such as \"{DEFAULT_HTTP}\", not {text!r}")
    if ":" in host and not bracketed:  # "localhost:80:80" is no address; an IPv6 host is written [::1]:8480
        raise ConfigError(f"{what} must be a quoted HOST:PORT such as \"{DEFAULT_HTTP}\", not {text!r}: the host "
                          f"{host!r} holds a ':' (an IPv6 host goes in brackets: \"[::1]:8480\")")
    return host, int(port)


def check_public_url(url: object, what: str) -> str:
    """``url`` when it is an http(s) URL with a host and nothing after the path (the package URLs devices are
    sent are ``URL/packages/NAME/VERSION``). ConfigError naming ``what`` otherwise."""
    u = urlparse(url) if isinstance(url, str) else None
    if u is None or u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise ConfigError(f"{what} must be a quoted http:// or https:// URL devices reach this server at, such as "
                          f"\"http://fleet.example:8480\", not {url!r}")
    return str(url).rstrip("/")


def _collect_storage(cls: type) -> tuple[StorageSetting, ...]:
    """The storage settings ``cls`` declares with ``_storage``, in declaration order; the kind is the annotation."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if _STORAGE not in f.metadata:
            continue
        kind, default = hints[f.name], f.default
        if kind not in (int, float) or not isinstance(default, int | float) or type(default) is not kind:
            raise TypeError(f"storage setting {f.name}: annotated {kind}, default {default!r}; both int or both float")
        out.append(StorageSetting(name=f.name, kind=kind, default=default, **f.metadata[_STORAGE]))
    return tuple(out)


# The bounded-storage settings, in declaration order: the table the flags, server.toml's [storage] table and the
# `housekeeping` printout are made from.
STORAGE: tuple[StorageSetting, ...] = _collect_storage(ServerSettings)
STORAGE_SETTINGS: tuple[str, ...] = tuple(s.name for s in STORAGE)  # their names, the [storage] keys
_BY_NAME: dict[str, StorageSetting] = {s.name: s for s in STORAGE}


def storage_rule_broken(name: str, value: object) -> str | None:
    """The rule ``value`` breaks as the bounded-storage setting ``name``, worded to follow "must be" (e.g. "a whole
    number from 1 to 1,000,000,000"), or None when ``value`` is allowed. One rule for the flags, server.toml and
    ServerSettings itself. KeyError when ``name`` is not in STORAGE_SETTINGS."""
    return _BY_NAME[name].rule(value)


def storage_table(table: object, source: str) -> dict[str, int | float]:
    """The bounded-storage settings a ``[storage]`` table sets (as read from the file ``source``), each checked with
    the rule its flag has and stored as its kind (TOML's ``0`` for a float setting is 0.0). ConfigError naming
    ``source``, the key and the rule; also for a key that is no storage setting (a typo must not fall back to the
    default unnoticed) and for a ``storage`` that is not a table."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: storage must be a table ([storage]) of {', '.join(STORAGE_SETTINGS)}, "
                          f"not {table!r}")
    unknown = [str(k) for k in table if k not in _BY_NAME]
    if unknown:
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} in [storage]: "
                          f"{named_unknown(unknown, STORAGE_SETTINGS)}; "
                          f"the keys are {', '.join(STORAGE_SETTINGS)}")
    out: dict[str, int | float] = {}
    for name, value in table.items():
        setting = _BY_NAME[name]
        rule = setting.rule(value)
        if rule is not None:
            unquote = " (a string: write the number without quotes)" if isinstance(value, str) else ""
            raise ConfigError(f"{source}: [storage] {name} must be {rule}, not {value!r}{unquote}")
        out[name] = setting.kind(value)
    return out
