"""What every `fleet-server` command shares: the data folder's settings (``server.toml`` and the storage
bounds of its ``[storage]`` table, flags on top), the storage flags, ``--data`` and output helpers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .settings import STORAGE_SETTINGS, ServerSettings, storage_table


def _settings(args: argparse.Namespace, **over: Any) -> ServerSettings:
    """The data folder's settings for any command: its ``server.toml`` (``fleet``, and the storage bounds of an
    optional ``[storage]`` table), with ``over`` (the command's flags) on top. ConfigError when the folder is not
    initialised or server.toml is not valid (the message names the file, the key and the rule)."""
    return _settings_and_sources(args, **over)[0]


def _settings_and_sources(args: argparse.Namespace, **over: Any) -> tuple[ServerSettings, dict[str, str]]:
    """As _settings, and where each storage setting came from: ``flag --NAME``, ``file PATH`` or ``default``."""
    data = Path(args.data)
    conf = data / "server.toml"
    if not conf.exists():
        raise ConfigError(f"{data} is not a fleet-server data folder; run `fleet-server init --data {data} "
                          "--root-key ROOT_PUB` first")
    try:
        base = tomllib.loads(conf.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{conf} is not valid TOML: {exc}") from None
    misplaced = [k for k in base if k in STORAGE_SETTINGS]
    if misplaced:  # above any table header: read as top-level keys, so they would silently do nothing
        raise ConfigError(f"{conf}: {', '.join(misplaced)} must be in the [storage] table (a `[storage]` line "
                          "above it, at the end of the file)")
    stored = storage_table(base.get("storage", {}), str(conf))
    settings = ServerSettings(data_dir=data, fleet=str(base.get("fleet", "default")), **{**stored, **over})
    sources = {name: f"flag --{name.replace('_', '-')}" if name in over else f"file {conf}" if name in stored
               else "default" for name in STORAGE_SETTINGS}
    return settings, sources


def _tags(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--tag {p!r} must be key=value")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def _print(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text(obj))


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the server's data folder")


# The bounded-storage settings (fleet_server/housekeeping.py, settings.STORAGE_SETTINGS), as flags of `serve` and
# `housekeeping`. Their home is server.toml's [storage] table (read by _settings for every command, so a cron job's
# `housekeeping` enforces what `serve` does); a flag overrides it for one run.
_STORAGE_FLAGS: tuple[tuple[str, type, str, str], ...] = (
    ("quarantine_max_rows", int, "N", "quarantine rows kept; the oldest are deleted past it"),
    ("quarantine_max_payload_mb", int, "MIB", "MiB of quarantined payloads kept; past it the oldest rows keep only "
                                              "their metadata (0 = no payloads)"),
    ("summary_retention_days", float, "DAYS", "days summaries are kept after receipt (0 = forever, else at least 1)"),
    ("housekeeping_interval_seconds", float, "SECONDS", "seconds between housekeeping passes"),
    ("housekeeping_chunk_rows", int, "N", "rows deleted per write transaction"),
)


def _storage_flags(p: argparse.ArgumentParser) -> None:
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    for name, kind, metavar, text in _STORAGE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, metavar=metavar,
                       help=f"{text} (for this run; else [storage] {name} in server.toml, else "
                            f"{_number(defaults[name])})")


def _number(v: float) -> str:
    """A setting's value as written in server.toml: 400.0 as 400, 1.5 as 1.5, 100000 as 100000."""
    return str(int(v)) if float(v).is_integer() else str(v)


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    return {f[0]: getattr(args, f[0]) for f in _STORAGE_FLAGS if getattr(args, f[0]) is not None}
