"""What every `fleet-server` command shares: the data folder's settings (``server.toml`` and the storage
bounds of its ``[storage]`` table, flags on top), the storage flags (made from ``settings.STORAGE``), ``--data``
and output helpers.

**server.toml is strict.** It holds exactly what is read from it: ``fleet = "NAME"`` (a quoted fleet id),
``http = "HOST:PORT"`` (where ``serve`` binds its HTTP API), ``public_url = "URL"`` (how devices reach that API:
the package URLs in the desired states every command signs, ``serve``'s and the CLI's ``rollback`` and
``rollout abort`` alike; default ``http://`` + ``http``) — the three ``init`` writes — and an optional
``[storage]`` table (:func:`settings.storage_table`, its own keys checked there). ``serve --http`` and
``--public-url`` override the file for one run only, and ``serve`` then warns that CLI commands still sign with
the file's URL. Anything else at the top level (a misspelled table ``[storag]``, a misspelled key ``flet = "x"``) stops
every command with one line naming the file, the entry and the nearest known name, rather than letting the
defaults apply unnoticed; so does a fleet that is not a quoted string (``fleet = 5`` is not read as ``"5"``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.tags import parse_tag
from edgefleet_contracts.topics import check_id

from .errors import ConfigError
from .settings import (
    DEFAULT_HTTP,
    STORAGE,
    STORAGE_SETTINGS,
    ServerSettings,
    check_public_url,
    parse_http_address,
    storage_table,
)


def _settings(args: argparse.Namespace, **over: Any) -> ServerSettings:
    """The data folder's settings for any command: its ``server.toml`` (``fleet``, and the storage bounds of an
    optional ``[storage]`` table), with ``over`` (the command's flags) on top. ConfigError when the folder is not
    initialised or server.toml is not valid (the message names the file, the key and the rule)."""
    return _settings_and_sources(args, **over)[0]


def _settings_or_defaults(args: argparse.Namespace) -> ServerSettings:
    """The settings of a command that needs only the database (`drift`, `alerts`): the data folder's, read and
    checked as _settings does for every other command, when it holds ``server.toml``; the defaults when it does not
    (a bare folder holding only ``fleet.sqlite``, such as a copy of the database taken elsewhere for analysis).
    ConfigError as _settings when server.toml is not valid: a broken file stops these commands as it stops
    ``serve``, rather than being ignored by some commands and not others."""
    if not (Path(args.data) / "server.toml").exists():
        return ServerSettings(data_dir=Path(args.data))
    return _settings(args)


def _settings_and_sources(args: argparse.Namespace, **over: Any) -> tuple[ServerSettings, dict[str, str]]:
    """As _settings, and where each storage setting came from: ``flag --NAME``, ``file PATH`` or ``default``."""
    data = Path(args.data)
    conf = data / "server.toml"
    if not conf.exists():
        raise ConfigError(f"{data} is not a fleet-server data folder; run `fleet-server init --data {data} "
                          "--root-key ROOT_PUB` first")
    try:
        base = tomllib.loads(conf.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{conf} is not valid TOML: {exc}") from None
    top = _top_level(base, conf)
    stored = storage_table(base.get("storage", {}), str(conf))
    settings = ServerSettings(data_dir=data, **{**top, **stored, **over})
    sources = {s.name: f"flag {s.flag}" if s.name in over else f"file {conf}" if s.name in stored else "default"
               for s in STORAGE}
    return settings, sources


# server.toml's top level: what `init` writes (the fleet's name, the HTTP address, the public URL) and the
# [storage] table. Nothing else is read.
SERVER_TOML_KEYS = ("fleet", "http", "public_url")
SERVER_TOML_TOP_LEVEL = (*SERVER_TOML_KEYS, "storage")
_HOLDS = ('server.toml holds fleet = "NAME", http = "HOST:PORT", public_url = "URL" and a [storage] table of '
          + ", ".join(STORAGE_SETTINGS))


def server_toml_text(fleet: str, http: str = DEFAULT_HTTP, public_url: str = "") -> str:
    """What ``init`` writes: the fleet, the HTTP address and, only when one was given, the public URL. Without
    one, devices are sent ``http://`` + the HTTP address in force: ``serve --http`` for one run moves the
    download URL with it (and warns that other commands sign with the file's address)."""
    url = f'public_url = "{public_url}"\n' if public_url else ""
    return f'fleet = "{fleet}"\nhttp = "{http}"\n' + url


def _top_level(base: dict[str, Any], conf: Path) -> dict[str, Any]:
    """Check server.toml's top level (see the module docstring); the ServerSettings fields it sets (``fleet``,
    and ``http_host``, ``http_port``, ``public_url`` when given). ConfigError naming ``conf``: for a storage key
    above the ``[storage]`` line, an unknown key or table (with the nearest known name), a fleet that is not a
    quoted string or not a fleet id, an ``http`` that is not HOST:PORT, a ``public_url`` that is not an http(s)
    URL."""
    misplaced = [k for k in base if k in STORAGE_SETTINGS]
    if misplaced:  # above any table header: read as top-level keys, so they would silently do nothing
        raise ConfigError(f"{conf}: {', '.join(misplaced)} must be in the [storage] table (a `[storage]` line "
                          "above it, at the end of the file)")
    unknown = [k for k in base if k not in SERVER_TOML_TOP_LEVEL]
    if unknown:
        named = [_unknown_entry(k, base[k]) for k in unknown]
        raise ConfigError(f"{conf}: unknown {', '.join(named)}; {_HOLDS}")
    fleet = base.get("fleet", "default")
    if not isinstance(fleet, str):
        raise ConfigError(f'{conf}: fleet must be a quoted string, like fleet = "default", not {fleet!r}')
    try:
        out: dict[str, Any] = {"fleet": check_id(fleet, "fleet")}
        if "http" in base:
            out["http_host"], out["http_port"] = parse_http_address(base["http"], "http")
        if base.get("public_url", "") != "":  # "" (or no key): http:// + the HTTP address
            out["public_url"] = check_public_url(base["public_url"], "public_url")
    except SchemaError as exc:
        raise ConfigError(f"{conf}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{conf}: {exc}") from None
    return out


def _unknown_entry(key: str, value: object) -> str:
    """An unknown top-level entry of server.toml as the error names it: ``table [storag] (did you mean
    [storage]?)``, ``key flet (did you mean fleet?)``, ``key summary_retention_day (did you mean
    summary_retention_days in the [storage] table?)``."""
    if isinstance(value, dict):
        match = difflib.get_close_matches(key, ["storage"], 1)
        return f"table [{key}]" + (" (did you mean [storage]?)" if match else "")
    match = difflib.get_close_matches(key, [*SERVER_TOML_KEYS, *STORAGE_SETTINGS], 1)
    if not match:
        return f"key {key}"
    where = " in the [storage] table" if match[0] in STORAGE_SETTINGS else ""
    return f"key {key} (did you mean {match[0]}{where}?)"


def _tags(pairs: list[str] | None, what: str = "--tag") -> dict[str, str]:
    """``key=value`` flags by the tag contract (:mod:`edgefleet_contracts.tags`). ConfigError naming the flag."""
    out = {}
    for p in pairs or []:
        try:
            k, v = parse_tag(p, what)
        except SchemaError as exc:
            raise ConfigError(str(exc)) from None
        out[k] = v
    return out


def _print(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text(obj))


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the server's data folder")


# The bounded-storage settings (fleet_server/housekeeping.py, settings.STORAGE) as flags of `serve` and
# `housekeeping`. Their home is server.toml's [storage] table (read by _settings for every command, so a cron job's
# `housekeeping` enforces what `serve` does); a flag overrides it for one run.
def _storage_flags(p: argparse.ArgumentParser) -> None:
    for s in STORAGE:
        p.add_argument(s.flag, dest=s.name, type=s.kind, metavar=s.unit,
                       help=f"{s.help} (for this run; else [storage] {s.name} in server.toml, else "
                            f"{_number(s.default)})")


def _number(v: float) -> str:
    """A setting's value as written in server.toml: 400.0 as 400, 1.5 as 1.5, 100000 as 100000."""
    return str(int(v)) if float(v).is_integer() else str(v)


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    """The storage flags given on the command line (those left out are None: server.toml or the default holds)."""
    return {s.name: getattr(args, s.name) for s in STORAGE if getattr(args, s.name) is not None}
