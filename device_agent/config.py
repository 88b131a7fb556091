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
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.topics import check_id

from .errors import AgentError

log = logging.getLogger("edgefleet.agent")


class ConfigError(AgentError):
    """config.toml is missing, unreadable or has an invalid value (the message names the key)."""

    reason = "config"


# The privacy floor on k (``min_window_samples``). Noise (``dp_epsilon``) covers a summary's histogram counts only;
# its per-feature sums and sums of squares are exact, so a summary of very few predictions gives their inputs away
# (with k = 1 the sum IS the input). Below this floor a config is refused unless ``allow_small_windows`` waives it;
# only a config.toml being loaded is lenient: it runs at the floor, with a warning (see DeviceConfig.from_dict).
MIN_WINDOW_SAMPLES_FLOOR = 10


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
    dp_epsilon: float = 0.0  # > 0 adds Laplace noise to counts with this epsilon per window
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
        try:
            check_id(self.device_id, "device_id")
            check_id(self.fleet, "fleet")
        except Exception as exc:
            raise ConfigError(str(exc)) from None
        if self.broker:
            u = urlparse(self.broker)
            if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
                raise ConfigError(f"broker {self.broker!r} must look like mqtt://host:port or mqtts://host:port")
        if self.server and urlparse(self.server).scheme not in ("http", "https"):
            raise ConfigError(f"server {self.server!r} must look like http://host:port")
        for name in ("window_seconds", "heartbeat_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("window_count", "outbox_max_rows", "prediction_log_max_rows", "image_stats_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not isinstance(self.allow_small_windows, bool):
            raise ConfigError(f"allow_small_windows must be true or false, not {self.allow_small_windows!r}")
        if self.min_window_samples < 1:
            raise ConfigError("min_window_samples must be at least 1")
        if self.min_window_samples < MIN_WINDOW_SAMPLES_FLOOR and not self.allow_small_windows:
            raise ConfigError(
                f"min_window_samples is {self.min_window_samples}, below the privacy floor of "
                f"{MIN_WINDOW_SAMPLES_FLOOR}: a summary of so few predictions gives their inputs away through its "
                f"exact per-feature sums (dp_epsilon noise covers the histogram counts only). Set "
                f"min_window_samples = {MIN_WINDOW_SAMPLES_FLOOR} or more (20 is the default); only a test, "
                f"benchmark or simulation on synthetic data may set allow_small_windows = true to waive the floor")
        if self.dp_epsilon < 0:
            raise ConfigError("dp_epsilon must be 0 (off) or positive")
        if not 0 < self.http_port < 65536:
            raise ConfigError("http_port must be 1..65535")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> DeviceConfig:
        """Build from a parsed config.toml; a key it lacks takes its default (older files load).

        One invalid value loads anyway: a ``min_window_samples`` from 1 to 9 without ``allow_small_windows = true``
        (a file written before the privacy floor existed, or edited by hand) runs at k = 10, the floor, and logs a
        warning naming ``source``, the value in the file, the value used and what to change. A device upgraded
        with such a file keeps serving, with the privacy-safe k, instead of stopping. The file is not rewritten:
        it is the operator's (a rewrite would drop their comments and layout, and may fail on a read-only
        folder), and the warning, logged each time the file is loaded, keeps the mismatch visible until they
        change it. Everything that writes a config (DeviceConfig in code, ``save_config``, ``device-agent
        provision``) stays strict.

        Raises ConfigError, prefixed with ``source``, for an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        configured = _below_the_floor(d)
        if configured is not None:
            d = {**d, "min_window_samples": MIN_WINDOW_SAMPLES_FLOOR}
            log.warning("%s: min_window_samples is %s, below the privacy floor of %d, and allow_small_windows is not "
                        "true: using min_window_samples = %d instead (smaller windows are held and merged forward). "
                        "A summary of so few predictions gives their inputs away through its exact per-feature sums "
                        "(dp_epsilon noise covers the histogram counts only). Set min_window_samples = %d or more "
                        "in %s (20 is the default) to silence this warning; the file is left as it is",
                        source, configured, MIN_WINDOW_SAMPLES_FLOOR, MIN_WINDOW_SAMPLES_FLOOR,
                        MIN_WINDOW_SAMPLES_FLOOR, source)
        try:
            return cls(**d)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

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


def _below_the_floor(d: dict[str, Any]) -> int | float | None:
    """The k of a parsed config file that loads at the floor instead: 1 <= k < 10 with the floor not waived.

    None for anything else, which DeviceConfig then judges as usual (k below 1 or not a number: refused; an
    ``allow_small_windows`` that is not a boolean: refused, whatever k is).
    """
    k = d.get("min_window_samples")
    if isinstance(k, bool) or not isinstance(k, int | float) or d.get("allow_small_windows", False) is not False:
        return None
    return k if 1 <= k < MIN_WINDOW_SAMPLES_FLOOR else None


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

    def slot(self, name: str) -> Path:
        return self.path / "slots" / name

    def load_config(self) -> DeviceConfig:
        """Raises ConfigError when the folder is not a provisioned device or config.toml is invalid.

        A ``min_window_samples`` below the privacy floor without the waiver is not an error here: the config
        comes back with k = 10 and a warning is logged (see DeviceConfig.from_dict); the file is not rewritten.
        """
        if not self.config_file.exists():
            raise ConfigError(f"{self.path} is not a provisioned device folder (no config.toml); "
                              "run `device-agent provision`")
        try:
            data = tomllib.loads(self.config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{self.config_file}: {exc}") from None
        return DeviceConfig.from_dict(data, str(self.config_file))

    def save_config(self, cfg: DeviceConfig) -> None:
        atomic_write_text(self.config_file, cfg.to_toml())
