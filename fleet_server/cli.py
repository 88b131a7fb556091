"""`fleet-server` command line: init, serve, devices, models, rollouts, simulate; tokens, backup and housekeeping
(``cli_admin``); drift and alerts (``cli_drift``).

Every command takes ``--data DIR`` (the server's data folder: ``fleet.sqlite``, ``packages/``, ``keys/``,
``server.toml``). Commands other than ``serve`` work directly on the data folder, so they also work while the
server is down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.signing import generate_key, load_public_key, save_private_key, save_public_key
from edgefleet_contracts.timeutil import duration_text, parse_duration

from . import devices, registry
from .cli_admin import add_admin_commands
from .cli_common import _data, _print, _settings, _storage, _storage_flags, _tags, server_toml_text
from .errors import ConfigError, FleetError, NotFoundError
from .settings import DEFAULT_HTTP, ServerSettings, check_public_url, parse_http_address
from .store import Store


# ---- init / serve ----------------------------------------------------------------------------------------
def _init(args: argparse.Namespace) -> int:
    """All or nothing: every precondition is checked before anything is written, and a failure while writing (a
    full disk) removes what this run wrote, so the folder is left as it was and ``init`` can simply run again."""
    data = Path(args.data)
    if (data / "server.toml").exists():
        raise ConfigError(f"{data} is already initialised; refusing to overwrite its keys")
    root = load_public_key(Path(args.root_key))  # validates the file
    host, port = parse_http_address(args.http, "--http")
    public_url = check_public_url(args.public_url, "--public-url") if args.public_url else ""
    settings = ServerSettings(data_dir=data, fleet=args.fleet, http_host=host, http_port=port, public_url=public_url)
    db = settings.db_path
    ours = [settings.root_pub, settings.fleet_key, settings.fleet_pub, db, db.with_name(db.name + "-wal"),
            db.with_name(db.name + "-shm")]
    present = [str(f.relative_to(data)) for f in ours if f.exists() or f.is_symlink()]
    if present:  # without server.toml: an earlier init that failed before this one cleaned up, or a hand copy
        raise ConfigError(f"{data} has no server.toml but already holds {', '.join(present)}; init writes none of "
                          "them over (keys/root.pub is the pinned root key): move them away, or restore the folder's "
                          "server.toml if it is a data folder")
    made: list[Path] = []  # what this run created, removed again (last first) if it fails
    try:
        for folder in (data, data / "keys"):
            if not folder.exists():
                folder.mkdir(parents=True)
                made.append(folder)
        (data / "keys").chmod(0o700)
        made.append(settings.root_pub)
        save_public_key(root, settings.root_pub)
        fleet_key = generate_key()
        made.append(settings.fleet_key)
        save_private_key(fleet_key, settings.fleet_key)
        made.append(settings.fleet_pub)
        save_public_key(fleet_key.public_key(), settings.fleet_pub)
        made.extend(ours[3:])
        Store(db).close()
        made.append(data / "server.toml")
        atomic_write_text(data / "server.toml", server_toml_text(args.fleet, args.http, public_url))
    except (OSError, sqlite3.Error) as exc:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink(missing_ok=True)
        raise ConfigError(f"init of {data} failed, nothing of it was kept: {exc}") from None
    print(f"initialised {data}: fleet {args.fleet}, devices download packages from {settings.base_url()} "
          f"(public_url in {data / 'server.toml'}); provision devices with --root-key {args.root_key} "
          f"--fleet-key {settings.fleet_pub}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    with _log_to_stderr():
        over: dict[str, Any] = {}
        if args.http is not None:
            over["http_host"], over["http_port"] = parse_http_address(args.http, "--http")
        if args.public_url is not None:
            over["public_url"] = check_public_url(args.public_url, "--public-url")
        stored = _settings(args)  # what every other command (rollback, rollout abort) signs package URLs with
        settings = _settings(args, broker=args.broker, embedded_mqtt_port=args.mqtt_port,
                             drift_interval_seconds=args.drift_interval, **over, **_storage(args))
        if settings.base_url() != stored.base_url():
            logging.getLogger("edgefleet.server").warning(
                "devices download packages from %s for this run (--http/--public-url), but server.toml says %s: "
                "desired states signed by CLI commands (rollback, rollout abort) will point at %s, where devices "
                "cannot download; set public_url = \"%s\" (and http) in %s", settings.base_url(),
                stored.base_url(), stored.base_url(), settings.base_url(), Path(args.data) / "server.toml")
        return serve(settings)


class _Stderr(logging.StreamHandler):
    """A handler writing to the standard error of the moment (as logging's last resort does)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """While ``serve`` runs: the server's loggers (``edgefleet.*`` and ``fleet_server.*``) at INFO on the
    standard error, with time, level and logger (uvicorn keeps its own handlers). The MQTT broker's loss and
    return are WARNINGs (mqtt_ingest). Left as they were afterwards."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("edgefleet", "fleet_server")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


# ---- devices -----------------------------------------------------------------------------------------------
def _devices(args: argparse.Namespace) -> int:
    s = _settings(args)
    store = Store(s.db_path)
    if args.devices_cmd == "enroll":
        try:
            before: dict[str, Any] | None = devices.get(store, args.device_id)
        except NotFoundError:
            before = None
        doc = devices.enroll(store, s.fleet, args.device_id, _public_key_flag(args.public_key), _tags(args.tag),
                             replace=args.replace)
        if before is not None and before["tags"] != doc["tags"]:  # enrolling again sets the tags it is given
            print(f"enrolled {doc['device_id']} again: tags {doc['tags']} replace {before['tags']} (enroll sets "
                  "the tags it is given)")
        else:
            print(f"enrolled {doc['device_id']} (tags {doc['tags']})")
    elif args.devices_cmd == "list":
        docs = devices.list_devices(store)
        _print(docs, args.json, lambda ds: "\n".join(
            f"{d['device_id']:<24} {_active(d):<24} {(d.get('reported') or {}).get('target') or '-':<20} "
            f"last seen {_ago(d['last_seen'])}  "
            + " ".join(f"{k}={v}" for k, v in sorted(d["tags"].items()))
            + ("  REVOKED" if d["state"] == "revoked" else "") for d in ds) or "no devices enrolled")
    elif args.devices_cmd == "revoke":
        doc = devices.revoke(store, args.device_id, args.reason, "cli")
        print(f"revoked {doc['device_id']}: {doc['revoked_reason']} (its messages are refused from now on; "
              "enroll --replace with a new key to bring it back)")
    elif args.devices_cmd == "show":
        _print(devices.get(store, args.device_id), True, str)
    elif args.devices_cmd == "enrollment-token":
        ttl = _ttl_flag(args.ttl)
        print(devices.create_enrollment_token(store, _tags(args.tag), ttl))
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + ttl))
        print(f"fleet-server: one-time token, expires {expires}; the device enrolls itself with POST "
              f"{s.base_url()}/api/v1/enroll {{token, device_id, public_key}} (its keys/device.pub)", file=sys.stderr)
    return 0


# The API's bounds of an enrollment token's life (POST /api/v1/enrollment-tokens ttl_seconds).
TOKEN_TTL_MIN_S, TOKEN_TTL_MAX_S = 1, 366 * 86400


def _ttl_flag(text: str) -> float:
    """``--ttl 1d`` in seconds, 1 s to 366 days as the API allows. ConfigError naming the flag."""
    try:
        ttl = parse_duration(text).total_seconds()
    except ContractError:
        raise ConfigError(f"--ttl {text!r} must be a whole number followed by d, h, m or s, e.g. 1d") from None
    if not TOKEN_TTL_MIN_S <= ttl <= TOKEN_TTL_MAX_S:
        raise ConfigError(f"--ttl {text!r} must be at least 1s and at most 366d: a token must be usable")
    return ttl


def _public_key_flag(value: str) -> str:
    """``--public-key``: the file holding the device's key (its keys/device.pub, PEM, or base64 on one line), or
    the key itself (base64 or PEM text). ConfigError naming the flag when it is neither."""
    path = Path(value)
    try:
        text = path.read_text() if path.is_file() else value
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--public-key {value}: cannot read it: {exc}") from None
    try:
        return devices.public_key_text(text)
    except ContractError as exc:
        what = f"the file {value}" if path.is_file() else f"{value!r} (no such file, nor a key)"
        raise ConfigError(f"--public-key {what}: {exc}") from None


def _active(d: dict[str, Any]) -> str:
    rep = d.get("reported") or {}
    a = rep.get("active")
    return f"{a['name']} {a['version']}" if a else "-"


def _ago(t: float | None) -> str:
    return "never" if not t else f"{int(time.time() - t)}s ago"


# ---- models ------------------------------------------------------------------------------------------------
def _models(args: argparse.Namespace) -> int:
    s = _settings(args)
    store = Store(s.db_path)
    if args.models_cmd == "publish":
        doc = registry.publish(store, s.packages_dir, s.root_pub, Path(args.package), owner=args.owner,
                               oncall=args.oncall, retrain_every=args.retrain_every, retrain_hook=args.retrain_hook,
                               retrain_on_drift=args.retrain_on_drift)
        print(f"published {doc['name']} {doc['version']} for {doc['target']} ({doc['length']} bytes, "
              f"sha256 {doc['sha256'][:16]}…); owner {doc['owner']}, paging {doc['oncall']}")
    elif args.models_cmd == "show":
        doc = registry.show(store, args.name)
        _print(doc, args.json, _model_text)
    elif args.models_cmd == "list":
        names = [r["name"] for r in store.query("SELECT name FROM models ORDER BY name")]
        print("\n".join(names) or "no models published")
    return 0


def _model_text(d: dict[str, Any]) -> str:
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) if t else "-"

    every = f"every {duration_text(d['retrain_every_s'])}" if d["retrain_every_s"] else "no cadence set"
    lines = [
        f"model {d['name']}",
        f"  owner: {d['owner']}   paged at: {d['oncall']}",
        f"  retraining: {every}; last retrained {when(d['last_retrained'])}; due {when(d['retrain_due'])}"
        + ("  (OVERDUE)" if d["retrain_overdue"] else ""),
        f"  retrain hook: {d['retrain_hook'] or '-'}   retrain on drift: {'yes' if d['retrain_on_drift'] else 'no'}",
        "  versions:",
    ]
    for v in d["versions"]:
        lines.append(f"    {v['version']:<10} {v['target']:<22} published {when(v['published'])}  "
                     f"data {str(v['lineage'].get('calibration_sha256', ''))[:12]}")
    return "\n".join(lines)


# ---- rollouts ----------------------------------------------------------------------------------------------
def _rollout(args: argparse.Namespace) -> int:
    from .rollouts import params, service

    s = _settings(args)
    store = Store(s.db_path)
    signer = service.DesiredSigner.from_settings(s)
    if args.rollout_cmd == "start":
        # The flags' own syntax is read here; what the values may be is checked by service.start, the check the
        # API shares (params.check), with errors naming the flags.
        rid = service.start(store, model=args.name, version=args.version, cohort=_tags(args.cohort, "--cohort"),
                            stages=args.stages, bake_seconds=_bake_flag(args.bake),
                            max_per_minute=args.max_per_minute, window=args.window or "",
                            thresholds=_gate_flags(args.gate), approve_stages=_approve_flag(args.approve),
                            actor="cli", names=params.FLAGS)
        print(rid)
        return 0
    if args.rollout_cmd == "list":
        _print(service.list_rollouts(store), args.json, lambda rs: "\n".join(
            f"{r['id']:<12} {r['kind']:<8} {r['model']} {r['version']:<8} {r['state']:<18} stage {r['stage']}"
            for r in rs) or "no rollouts")
        return 0
    if args.rollout_cmd == "status":
        _print(service.status(store, args.id), args.json, _rollout_text)
        return 0
    st = service.set_state(store, signer, args.id, args.rollout_cmd, "cli")
    print(f"{st['id']}: {st.get('message', st['state'])}")
    return 0


def _bake_flag(text: str) -> float:
    """``--bake 10m`` in seconds. ConfigError naming the flag when it is not a duration."""
    try:
        return parse_duration(text).total_seconds()
    except ContractError:
        raise ConfigError(f"--bake {text!r} must be a whole number followed by d, h, m or s, e.g. 10m") from None


def _gate_flags(pairs: list[str] | None) -> dict[str, float]:
    """``--gate NAME=NUMBER`` flags. ConfigError naming the flag when one is not NAME=NUMBER; which names and
    numbers are allowed is params.check's to say."""
    out: dict[str, float] = {}
    for g in pairs or []:
        k, sep, v = g.partition("=")
        try:
            if not (k and sep):
                raise ValueError(g)
            out[k] = float(v)
        except ValueError:
            raise ConfigError(f"--gate {g!r} must be NAME=NUMBER, e.g. max_p95_latency_ratio=1.5") from None
    return out


def _approve_flag(text: str | None) -> list[int]:
    """``--approve 3,4``: stage numbers. ConfigError naming the flag when one is not a whole number; which stages
    exist is params.check's to say."""
    try:
        return [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--approve {text!r} must be stage numbers separated by commas, e.g. 3,4") from None


def _rollout_text(st: dict[str, Any]) -> str:
    lines = [f"rollout {st['id']} ({st['kind']}): {st['model']} {st['version']} (previous {st['previous']})",
             f"  state {st['state']}, stage {st['stage']} of {len(st['stages'])} {st['stages']}, cohort "
             f"{st['cohort'] or 'all'}",
             f"  pace: {_pace_text(st)}",
             f"  gates (each stage, after a bake of {st['bake_seconds']:g} s): "
             + ", ".join(f"{k} {v:g}" for k, v in sorted(st["thresholds"].items())),
             f"  devices: {st['devices'] or 'none asked yet'}"
             + (f"; {st['not_yet_asked']} more of this stage not asked yet" if st.get("not_yet_asked") else ""),
             *([f"  left out, they report another target than the package's: {', '.join(st['other_target'][:10])}"
                + (f" and {len(st['other_target']) - 10} more" if len(st["other_target"]) > 10 else "")]
               if st.get("other_target") else []),
             "  decisions:"]
    for d in st["decisions"]:
        lines.append(f"    {time.strftime('%H:%M:%S', time.gmtime(d['at']))} {d['actor']:<8} {d['kind']:<15} "
                     f"{d['detail']}")
    return "\n".join(lines)


def _pace_text(st: dict[str, Any]) -> str:
    """The rollout's maintenance window and rate limit, and whether it waits for the window now."""
    per = st["max_per_minute"]
    rate = f"at most {per} device(s) a minute" if per else "no rate limit"
    if not st["window"]:
        return f"any time (no maintenance window), {rate}"
    text = f"maintenance window {st['window']} UTC, {rate}"
    if st["waiting_for_window"]:
        opens = st["window_opens_in_seconds"]
        text += (f"; WAITING for the window (opens in {int(opens // 3600)}h{int(opens % 3600 // 60):02d}m): "
                 "devices of this stage are asked to move only inside it")
    return text


def _rollback(args: argparse.Namespace) -> int:
    from .rollouts import service

    s = _settings(args)
    store = Store(s.db_path)
    rid = service.rollback(store, service.DesiredSigner.from_settings(s), args.name, args.to,
                           _tags(args.cohort, "--cohort"), "cli", cohort_name="--cohort")
    print(f"{rid}: {args.name} rolled back to {args.to}")
    for d in reversed(service.status(store, rid)["decisions"]):  # the rollback's counts, then any warning
        print(f"  {d['kind']}: {d['detail']}")
    return 0


# ---- simulate ----------------------------------------------------------------------------------------------
def _simulate(args: argparse.Namespace) -> int:
    """Provision N simulated devices (the real agent code) against a running server and stream rows for a
    bounded time; prints predictions made and the outbox depth at stop.

    Exit status 0 when the server heard from the devices (a warning on the standard error when some devices never
    connected to the broker), 1 when nothing was delivered: no device could connect to ``--broker``, or they
    connected and the server heard from none (``--broker`` is not the broker the server ingests from); see
    ``simulator.Delivery``. The summary line is printed in every case. An unreachable ``--server``, a refused or
    viewer ``--token`` and a ``--rows`` file that is not ``.npz``/``.npy`` stop it before any device is made."""
    from .simulator import Fleet, SimConfig, load_rows, rows_sampler

    for flag, value, least in (("--devices", args.devices, 1), ("--batch", args.batch, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, not {value}")
    if not args.duration > 0:
        raise ConfigError(f"--duration must be more than 0 seconds, not {args.duration:g}")
    x = load_rows(Path(args.rows))
    fleet = Fleet(SimConfig(root=Path(args.dir), server_url=args.server, broker_url=args.broker,
                            operator_token=args.token, root_pub=Path(args.root_key), fleet_pub=Path(args.fleet_key),
                            devices=args.devices, first_package=Path(args.package) if args.package else None,
                            prefix=args.prefix, target=args.target))
    from device_agent.errors import AgentError

    try:
        fleet.provision()
    except AgentError as exc:  # e.g. --package built for another target: a clear error, not a traceback
        fleet.stop()
        raise ConfigError(f"cannot provision the simulated devices: {exc}") from None
    except BaseException:
        fleet.stop()
        raise
    fleet.start()
    sample = rows_sampler(x, args.seed)
    made, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < args.duration:
            made += fleet.stream(sample, args.batch)
        fleet.flush_windows()
        depth = fleet.outbox_depth()
        elapsed = time.monotonic() - t0
        delivery = fleet.delivery(depth)
    finally:
        fleet.stop()  # each runner closes its window and keeps what was not acknowledged in its outbox
    print(f"{len(fleet.devices)} devices, {made} predictions in {elapsed:.1f} s ({made / elapsed:,.0f}/s), "
          f"outbox depth at stop {depth}")
    error, warning = delivery.verdict()
    if warning:
        print(f"fleet-server: warning: {warning}", file=sys.stderr)
    if error:
        raise ConfigError(error)
    return 0


# ---- parser ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-server", description="edgefleet fleet server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a data folder: pinned root key, fleet signing key, database")
    _data(p)
    p.add_argument("--root-key", required=True, help="the packager's root public key (root.pub)")
    p.add_argument("--fleet", default="default")
    p.add_argument("--http", default=DEFAULT_HTTP, help=f"HOST:PORT serve binds to (default {DEFAULT_HTTP})")
    p.add_argument("--public-url", help="how devices reach this server over HTTP, e.g. https://fleet.example "
                   "(package URLs in signed desired states; default http://HOST:PORT of --http)")
    p.set_defaults(func=_init)

    p = sub.add_parser("serve", help="run the server (HTTP API, MQTT ingest, drift and alerts)")
    _data(p)
    p.add_argument("--broker", default="embedded", help="embedded | mqtt://HOST:PORT | none")
    p.add_argument("--http", help="HOST:PORT to bind, for this run (else http in server.toml, else "
                   f"{DEFAULT_HTTP}); CLI commands do not know it: prefer server.toml")
    p.add_argument("--mqtt-port", type=int, default=1884, help="embedded broker port (0 picks a free port)")
    p.add_argument("--public-url", help="how devices reach this server over HTTP (package downloads), for this run "
                   "(else public_url in server.toml); CLI commands sign with server.toml's: prefer server.toml")
    p.add_argument("--drift-interval", type=float, default=30.0, help="seconds between drift evaluations")
    _storage_flags(p)
    p.set_defaults(func=_serve)
    add_admin_commands(sub)

    d = sub.add_parser("devices", help="enroll and list devices")
    dsub = d.add_subparsers(dest="devices_cmd", required=True)
    p = dsub.add_parser("enroll")
    _data(p)
    p.add_argument("--device-id", required=True)
    p.add_argument("--public-key", required=True, help="the device's keys/device.pub (PEM, or base64 on one line), "
                   "or the key itself as base64")
    p.add_argument("--tag", action="append", help="key=value (repeatable)")
    p.add_argument("--replace", action="store_true", help="replace the key of an enrolled device")
    p.set_defaults(func=_devices)
    for name in ("list", "show"):
        p = dsub.add_parser(name)
        _data(p)
        if name == "show":
            p.add_argument("device_id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_devices)
    p = dsub.add_parser("revoke", help="revoke a lost, stolen or retired device: its messages are refused")
    _data(p)
    p.add_argument("device_id")
    p.add_argument("--reason", required=True, help='why, for the record (e.g. "stolen from ward 3")')
    p.set_defaults(func=_devices)
    p = dsub.add_parser("enrollment-token", help="a one-time token for a device that enrolls itself")
    _data(p)
    p.add_argument("--tag", action="append")
    p.add_argument("--ttl", default="1d", help="how long the token is usable, 1s to 366d (default 1d)")
    p.set_defaults(func=_devices)

    m = sub.add_parser("models", help="the model registry")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    p = msub.add_parser("publish", help="verify and publish a package")
    p.add_argument("package")
    _data(p)
    p.add_argument("--owner", help="the model's owner, a team or a person (needed on its first publish; "
                   "kept when left out)")
    p.add_argument("--oncall", help="the owner's on-call webhook URL (needed on its first publish; kept when left out)")
    p.add_argument("--retrain-every", help='retraining cadence such as 30d ("" clears it; kept when left out)')
    p.add_argument("--retrain-hook", help='command to run when retraining is due ("" clears it; kept when left out)')
    p.add_argument("--retrain-on-drift", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the retraining hook when a drift alert opens (kept when left out)")
    p.set_defaults(func=_models)
    p = msub.add_parser("show")
    p.add_argument("name")
    _data(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models)
    p = msub.add_parser("list")
    _data(p)
    p.set_defaults(func=_models)

    r = sub.add_parser("rollout", help="staged rollouts with health gates")
    rsub = r.add_subparsers(dest="rollout_cmd", required=True)
    p = rsub.add_parser("start")
    p.add_argument("name")
    p.add_argument("version")
    _data(p)
    p.add_argument("--cohort", action="append", help="key=value tag filter (repeatable)")
    p.add_argument("--stages", default="1,10,50,100", help="cumulative percentages")
    p.add_argument("--bake", default="10m", help="time each stage bakes before its gates are judged")
    p.add_argument("--max-per-minute", type=int, default=0, help="devices moved per minute (0 = no limit)")
    p.add_argument("--window", help="maintenance window HH:MM-HH:MM (UTC)")
    p.add_argument("--gate", action="append", help="threshold override, e.g. max_p95_latency_ratio=1.3")
    p.add_argument("--approve", help="stages (1-based) that need an operator's approval, e.g. 3,4")
    p.set_defaults(func=_rollout)
    p = rsub.add_parser("list")
    _data(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_rollout)
    for name in ("status", "pause", "resume", "abort", "approve"):
        p = rsub.add_parser(name)
        p.add_argument("id")
        _data(p)
        if name == "status":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=_rollout)
    p = sub.add_parser("rollback", help="send a cohort back to a version (no gates)")
    p.add_argument("name")
    p.add_argument("--to", required=True)
    _data(p)
    p.add_argument("--cohort", action="append")
    p.set_defaults(func=_rollback)

    p = sub.add_parser("simulate", help="run N simulated devices (real agent code) against a server, bounded in time",
                       epilog="exit status: 0 when the server heard from the devices, 1 when nothing was delivered "
                              "(no device reached --broker, or the server heard from none) or on an error")
    p.add_argument("--server", required=True, help="the server's HTTP URL (enrollment, package downloads)")
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT the server ingests from")
    p.add_argument("--token", required=True, help="an operator token (enrollment)")
    p.add_argument("--root-key", required=True)
    p.add_argument("--fleet-key", required=True, help="the server's keys/fleet.pub")
    p.add_argument("--rows", required=True, help=".npz holding x, or .npy: rows the devices predict on (resampled)")
    p.add_argument("--dir", required=True, help="where the device folders go")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--package", help="first package installed at provisioning (otherwise roll one out)")
    p.add_argument("--target", default="x86_64-avx2",
                   help="hardware target the simulated devices claim (must match --package's target)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (bounded)")
    p.add_argument("--batch", type=int, default=10, help="rows per device per round")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_simulate)

    from .cli_drift import add_alert_commands, add_drift_commands  # scipy and numpy: loaded when the CLI is built

    add_drift_commands(sub)
    add_alert_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # here, so that a reader gone before the exit's flush is handled below
        return rc
    except BrokenPipeError:  # `fleet-server drift ... | head`: the reader left; quiet, as standard tools are
        # Python flushes stdout again at exit, which would fail once more: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, the shell's status for a command a pipe's reader stopped
    except ContractError as exc:
        print(f"fleet-server: REJECTED ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    except (FleetError, OSError) as exc:
        print(f"fleet-server: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"fleet-server: error: {_database_error(args, exc)}", file=sys.stderr)
        return 1


def _database_error(args: argparse.Namespace, exc: sqlite3.Error) -> str:
    """One line for an error SQLite raised, naming the database file; for a damaged one (malformed, truncated,
    not a database), what to do about it."""
    data = getattr(args, "data", None)
    where = f"the database {Path(data) / 'fleet.sqlite'}" if data else "a database"
    damaged = (isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)
               or "malformed" in str(exc))
    if damaged:
        return (f"{where} is damaged ({exc}); stop the server and restore the data folder from a backup "
                "(`fleet-server backup` made one; serve --data on it)")
    return f"{where}: {exc}"


if __name__ == "__main__":
    raise SystemExit(main())
