"""Device configuration (``config.toml``) and the device folder layout, built once and passed in.

A device folder, written by ``device-agent provision``::

    config.toml          DeviceConfig below (no secrets)
    target.toml          copy of the hardware target profile (the device never needs the repository)
    keys/device.key      the device's Ed25519 private key (0600): signs summaries and reports
    keys/device.pub      its public key (enrol it on the fleet server)
    keys/root.pub        pinned root public key: the only trust anchor for packages
    keys/fleet.pub       pinned fleet public key: verifies desired-state commands
    trust.json           highest keyset version accepted, latest time seen (clock high-water mark)
    slots/a, slots/b     A/B model slots (verified, extracted packages)
    active.json          pointer to the active slot (atomic replace)
    update.json          updater state machine, persisted on entry to each state
    desired.json         last accepted desired-state sequence number, last rejection, outcome per seq
    downloads/           partial package downloads (resumed with HTTP Range)
    outbox.sqlite        durable queue of signed summaries and reports (WAL)
    predictions/         bounded, rotating prediction log (binary segments; see predlog.py)
    link.json            the MQTT link's state (written by the link)
    agent.json           pid and local API address of the running `device-agent run` (removed when it stops);
                         `device-agent status` asks that agent for its counters
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.process import warn_once
from edgefleet_contracts.timeutil import DailyWindow
from edgefleet_contracts.topics import check_id

from .errors import AgentError
from .probation import MIN_LATENCY_SAMPLES

log = logging.getLogger("edgefleet.agent")


class ConfigError(AgentError):
    """config.toml is missing, unreadable or has an invalid value (the message names the key)."""

    reason = "config"


# The privacy floor on k (``min_window_samples``). Noise (``dp_epsilon``) covers a summary's histogram counts only;
# its per-feature sums and sums of squares are exact, so a summary of very few predictions gives their inputs away
# (with k = 1 the sum IS the input). Below this floor a config is refused unless ``allow_small_windows`` waives it;
# only a config.toml being loaded is lenient: it runs at the floor, with a warning (see DeviceConfig.from_dict).
MIN_WINDOW_SAMPLES_FLOOR = 10

# The range of ``dp_epsilon`` (0 is off). The noise on each released count has scale 1/epsilon: at 0.01 it is
# about 100 counts per bin, already more than most windows hold; below it (1e-9 gave counts of 1e9, 1e-300 a
# division by zero and every window lost) a summary says nothing. Above 100 the noise is below 1/100 of a count:
# no privacy at all, and a value that large is a typo for a small one.
DP_EPSILON_MIN = 0.01
DP_EPSILON_MAX = 100.0

# A host name as RFC 1123 allows it: dot-separated labels of letters, digits and inner hyphens (a final dot is
# allowed: a fully qualified name).
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(text: str) -> bool:
    """True for an IPv4 or IPv6 address, or a well-formed host name (it need not resolve here)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    target: str
    fleet: str = "default"
    broker: str = ""  # mqtt://host:port or mqtts://host:port; empty = no link (offline device)
    server: str = ""  # http://host:port of the fleet server (package downloads, HTTP summaries)
    mqtt_username: str = ""
    mqtt_password_file: str = ""  # path to a 0600 file; never the password itself
    mqtt_tls_ca: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    window_seconds: float = 300.0  # a window closes after this long ...
    window_count: int = 1000  # ... or after this many predictions, whichever comes first
    min_window_samples: int = 20  # k: smaller windows are merged forward, never sent alone (>= 10 enforced)
    # True waives the k >= 10 privacy floor (tests, benchmarks, simulations on synthetic data only). It is
    # written to config.toml so an operator can see that a device runs with the floor waived.
    allow_small_windows: bool = False
    # 0 = off; else Laplace noise on counts with this epsilon per window, from DP_EPSILON_MIN to DP_EPSILON_MAX
    dp_epsilon: float = 0.0
    image_stats_every: int = 4  # derived image statistics on 1 image in N (they cost ~5 µs each)
    outbox_max_rows: int = 10_000
    prediction_log_max_rows: int = 100_000
    http_host: str = "127.0.0.1"
    http_port: int = 8470
    heartbeat_seconds: float = 60.0
    probation_seconds: float = 600.0
    probation_predictions: int = 200
    probation_max_error_rate: float = 0.05
    probation_latency_ratio: float = 2.0  # p95 of the new version over the previous one's ...
    probation_latency_floor_ms: float = 0.5  # ... and at least this much slower in absolute terms
    maintenance_window: str = ""  # "HH:MM-HH:MM" UTC when model swaps may happen; empty = any time
    download_rate_limit: float = 0.0  # bytes/s, 0 = no cap
    download_read_timeout: float = 30.0
    busy_defer_seconds: float = 300.0  # wait this long for a running batch before deferring a swap

    def __post_init__(self) -> None:
        """Raises ConfigError naming the key, for a value of the wrong type (``check_types``) or out of range."""
        check_types(self, type(self))
        for name in _FLOAT_KEYS:  # a whole number written for a float key (``window_seconds = 300``) is kept a float
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, float(value))
        try:
            check_id(self.device_id, "device_id")
            check_id(self.fleet, "fleet")
        except Exception as exc:
            raise ConfigError(str(exc)) from None
        if self.broker:
            u = urlparse(self.broker)
            try:
                port_ok = u.port is None or u.port > 0  # .port raises for a port past 65535 or not a number
            except ValueError:
                port_ok = False
            if u.scheme not in ("mqtt", "mqtts") or not u.hostname or not port_ok:
                raise ConfigError(f"broker {self.broker!r} must look like mqtt://host:port or mqtts://host:port "
                                  "(a port from 1 to 65535)")
        if self.server and urlparse(self.server).scheme not in ("http", "https"):
            raise ConfigError(f"server {self.server!r} must look like http://host:port")
        for name in ("window_seconds", "heartbeat_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("window_count", "outbox_max_rows", "prediction_log_max_rows", "image_stats_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if self.min_window_samples < 1:
            raise ConfigError(f"min_window_samples must be at least 1, not {self.min_window_samples!r}")
        if self.min_window_samples < MIN_WINDOW_SAMPLES_FLOOR and not self.allow_small_windows:
            raise ConfigError(
                f"min_window_samples is {self.min_window_samples}, below the privacy floor of "
                f"{MIN_WINDOW_SAMPLES_FLOOR}: a summary of so few predictions gives their inputs away through its "
                f"exact per-feature sums (dp_epsilon noise covers the histogram counts only). Set "
                f"min_window_samples = {MIN_WINDOW_SAMPLES_FLOOR} or more (20 is the default); only a test, "
                f"benchmark or simulation on synthetic data may set allow_small_windows = true to waive the floor")
        if self.dp_epsilon != 0 and not DP_EPSILON_MIN <= self.dp_epsilon <= DP_EPSILON_MAX:
            raise ConfigError(
                f"dp_epsilon must be 0 (off) or from {DP_EPSILON_MIN:g} to {DP_EPSILON_MAX:g}, not "
                f"{self.dp_epsilon!r}: below {DP_EPSILON_MIN:g} the noise on each count (about 1/dp_epsilon) "
                f"drowns every window; above {DP_EPSILON_MAX:g} it protects nothing (0.1 to 2 is usual)")
        if not _is_host(self.http_host):
            raise ConfigError(f"http_host must be an IP address or a host name (127.0.0.1, ::1, localhost, "
                              f"device-7.local), not {self.http_host!r}")
        if not 0 < self.http_port < 65536:
            raise ConfigError(f"http_port must be 1..65535, not {self.http_port!r}")
        # The rollout keys (read by the desired-state handler and the probation watch): checked here, so a bad
        # value stops the device at start-up naming its key, rather than the first rollout.
        for name in ("probation_seconds", "download_read_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("download_rate_limit", "busy_defer_seconds", "probation_latency_floor_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, not {getattr(self, name)!r}")
        if self.probation_predictions < 1:
            raise ConfigError(f"probation_predictions must be at least 1, not {self.probation_predictions!r}")
        if not 0 <= self.probation_max_error_rate < 1:
            raise ConfigError("probation_max_error_rate must be at least 0 and below 1 (0.05 is 5 %), not "
                              f"{self.probation_max_error_rate!r}")
        if self.probation_latency_ratio < 1:
            raise ConfigError(f"probation_latency_ratio must be at least 1.0, not {self.probation_latency_ratio!r}")
        if self.maintenance_window:
            try:
                DailyWindow.parse(self.maintenance_window)
            except ValueError as exc:
                raise ConfigError(f"maintenance_window: {exc}; empty means any time") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> DeviceConfig:
        """Build from a parsed config.toml; a key it lacks takes its default (older files load).

        Every key is checked for its type first (``check_types``: ``window_count = "1000"`` is refused naming
        ``source``, the key, the type expected and the value), then for its range.

        One invalid value loads anyway: a ``min_window_samples`` from 1 to 9 without ``allow_small_windows = true``
        (a file written before the privacy floor existed, or edited by hand) runs at k = 10, the floor, and logs a
        warning naming ``source``, the value in the file, the value used and what to change. A device upgraded
        with such a file keeps serving, with the privacy-safe k, instead of stopping. The file is not rewritten:
        it is the operator's (a rewrite would drop their comments and layout, and may fail on a read-only
        folder), and the warning keeps the mismatch visible until they change it. It is logged once per process
        for each file and value (``warn_once``): every start of ``device-agent run`` and every other command
        warns once, however many of its parts (agent, updater, desired-state handler, each report) load the
        file. Everything that writes a config (DeviceConfig in code, ``save_config``, ``device-agent
        provision``) stays strict.

        A valid value that silently switches a check off also warns once per process: ``probation_predictions``
        below 100 (``probation.MIN_LATENCY_SAMPLES``) may end probation before the new version has the latencies the
        device's p95 comparison needs, so the latency of a new version is then not checked on this device (once
        per process and value, whatever the file: a simulator loads hundreds alike).

        Raises ConfigError, prefixed with ``source``, for an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            check_types(d, cls)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        configured = _below_the_floor(d)
        if configured is not None:
            d = {**d, "min_window_samples": MIN_WINDOW_SAMPLES_FLOOR}
            if warn_once(("min_window_samples", source, configured)):
                log.warning("%s: min_window_samples is %s, below the privacy floor of %d, and allow_small_windows is "
                            "not true: using min_window_samples = %d instead (smaller windows are held and merged "
                            "forward). A summary of so few predictions gives their inputs away through its exact "
                            "per-feature sums (dp_epsilon noise covers the histogram counts only). Set "
                            "min_window_samples = %d or more in %s (20 is the default) to silence this warning; the "
                            "file is left as it is",
                            source, configured, MIN_WINDOW_SAMPLES_FLOOR, MIN_WINDOW_SAMPLES_FLOOR,
                            MIN_WINDOW_SAMPLES_FLOOR, source)
        try:
            cfg = cls(**d)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        n = cfg.probation_predictions
        # Once per process and value, not per file: a simulator loads hundreds of device folders alike.
        if n < MIN_LATENCY_SAMPLES and warn_once(("probation_predictions", n)):
            log.warning("%s: probation_predictions is %d, below %d: probation may end after %d predictions of a "
                        "new version, before it has the %d latencies the device's latency check needs, so a new "
                        "version's p95 latency is compared with the previous one's only when more predictions came "
                        "in by the time it ends (otherwise the commit says 'latency not compared'). Set "
                        "probation_predictions = %d or more in %s (200 is the default) to keep the check (said once "
                        "per process)", source, n, MIN_LATENCY_SAMPLES, n, MIN_LATENCY_SAMPLES,
                        MIN_LATENCY_SAMPLES, source)
        return cfg

    def to_toml(self) -> str:
        lines = []
        tags = {}
        for k, v in asdict(self).items():
            if k == "tags":
                tags = v
                continue
            if isinstance(v, str):
                lines.append(f"{k} = {_toml_str(v)}")
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            else:
                lines.append(f"{k} = {v}")
        lines.append("")
        lines.append("[tags]")
        lines.extend(f"{_toml_str(k)} = {_toml_str(v)}" for k, v in sorted(tags.items()))
        return "\n".join(lines) + "\n"


def _below_the_floor(d: dict[str, Any]) -> int | None:
    """The k of a parsed (and type-checked) config file that loads at the floor instead: 1 <= k < 10 with the
    floor not waived.

    None for anything else, which DeviceConfig then judges as usual (k below 1: refused).
    """
    k = d.get("min_window_samples")
    if not isinstance(k, int) or d.get("allow_small_windows", False) is not False:
        return None
    return k if 1 <= k < MIN_WINDOW_SAMPLES_FLOOR else None


# ---- types ------------------------------------------------------------------------------------------------
# What each annotation of DeviceConfig accepts, how the message names it and an example of the right form.
_TYPE_NAMES = {"str": "a string in quotes", "int": "a whole number", "float": "a number", "bool": "true or false",
               "dict[str, str]": "a table of strings"}
_FLOAT_KEYS = tuple(f.name for f in fields(DeviceConfig) if f.type == "float")


def _example(name: str, default: Any) -> str:
    if name == "tags":
        return '[tags] site = "north"'
    if isinstance(default, str):
        return f"{name} = {_toml_str(default or '…')}"
    if isinstance(default, bool):
        return f"{name} = {'true' if default else 'false'}"
    return f"{name} = {default}"


def _described(value: Any) -> str:
    """A value as a TOML reader would name it: ``the string "1000"``, ``the number 5.5``, ``a table {…}``."""
    if isinstance(value, str):
        return f"the string {_toml_str(value[:60])}" + ("…" if len(value) > 60 else "")
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, Mapping):
        return f"a table {dict(value)!r}"[:80]
    if isinstance(value, list):
        return f"an array {value!r}"[:80]
    return f"the {type(value).__name__} {value!r}"[:80]  # a TOML date or time


def _type_ok(annotation: str, value: Any) -> bool:
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "dict[str, str]":
        return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    raise AssertionError(f"DeviceConfig has a field of type {annotation}: teach check_types about it")


def check_types(values: Any, cls: type[DeviceConfig]) -> None:
    """Raise ConfigError for the first key of ``values`` (a mapping of config keys, or a DeviceConfig) whose value
    does not have the type its field declares, naming the key, the type, an example and the value: ``window_count
    must be a whole number (window_count = 1000), not the string "1000"``. A float key takes a whole number too,
    but no infinity or NaN; nothing takes a boolean but a boolean key."""
    items = values.items() if isinstance(values, Mapping) else ((f.name, getattr(values, f.name)) for f in fields(cls))
    declared = {f.name: f for f in fields(cls)}
    for name, value in items:
        f = declared.get(name)
        if f is None:
            continue
        annotation = str(f.type)
        if not _type_ok(annotation, value):
            default = (f.default if f.default is not MISSING
                       else f.default_factory() if f.default_factory is not MISSING else "")
            kind = _TYPE_NAMES[annotation]
            if annotation == "float" and isinstance(value, float):
                kind = "a finite number"
            raise ConfigError(f"{name} must be {kind} ({_example(name, default)}), not {_described(value)}")


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class DeviceDir:
    path: Path

    config_file = property(lambda self: self.path / "config.toml")
    target_file = property(lambda self: self.path / "target.toml")
    keys = property(lambda self: self.path / "keys")
    device_key = property(lambda self: self.path / "keys" / "device.key")
    device_pub = property(lambda self: self.path / "keys" / "device.pub")
    root_pub = property(lambda self: self.path / "keys" / "root.pub")
    fleet_pub = property(lambda self: self.path / "keys" / "fleet.pub")
    trust_file = property(lambda self: self.path / "trust.json")
    slots = property(lambda self: self.path / "slots")
    active_file = property(lambda self: self.path / "active.json")
    update_file = property(lambda self: self.path / "update.json")
    outbox = property(lambda self: self.path / "outbox.sqlite")
    prediction_log = property(lambda self: self.path / "predictions")
    link_file = property(lambda self: self.path / "link.json")
    agent_file = property(lambda self: self.path / "agent.json")

    def slot(self, name: str) -> Path:
        return self.path / "slots" / name

    def load_config(self) -> DeviceConfig:
        """Raises ConfigError when the folder is not a provisioned device or config.toml is invalid.

        A ``min_window_samples`` below the privacy floor without the waiver is not an error here: the config
        comes back with k = 10 and a warning is logged, once per process (see DeviceConfig.from_dict); the file
        is not rewritten.
        """
        if not self.config_file.exists():
            raise ConfigError(f"{self.path} is not a provisioned device folder (no config.toml); "
                              "run `device-agent provision`")
        try:
            data = tomllib.loads(self.config_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.config_file}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{exc.start}); TOML files are UTF-8") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{self.config_file}: {exc}") from None
        return DeviceConfig.from_dict(data, str(self.config_file))

    def save_config(self, cfg: DeviceConfig) -> None:
        atomic_write_text(self.config_file, cfg.to_toml())
