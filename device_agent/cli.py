"""`device-agent` command line.

Each subcommand is registered by a small ``_add_<name>(sub)`` function listed in ``REGISTRARS``; a new command
(``run``, ``predict``, ``batch``, ``serve``) is one more function and one more entry.

Exit codes: 0 ok; 1 rejected / failed / error, with one line on stderr, ``device-agent: error (REASON):
MESSAGE``, naming the file, key or port at fault (an input or config file that cannot be read, a store that
cannot be opened, a local API that cannot listen: ``http_listen``; anything unforeseen: ``internal``, with the
traceback under ``-v``); 2 usage. No other status leaves ``main`` (uvicorn's own startup failure, 3, is turned
into ``http_listen``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.process import LockHeldError, pid_lock

from .config import DeviceDir
from .errors import AgentError
from .status import link_state, outbox_depth, status_doc  # re-exported: tools and tests import them from here

if TYPE_CHECKING:
    from .updater import InstallResult

__all__ = ["REGISTRARS", "build_parser", "link_state", "main", "outbox_depth", "status_doc"]


# ---- provision ----------------------------------------------------------------------------------------
def _tag(text: str) -> tuple[str, str]:
    from .provision import ProvisionError, parse_tag

    try:
        return parse_tag(text)
    except ProvisionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_provision(sub: Any) -> None:
    p = sub.add_parser("provision", help="create a device folder: config, target profile, keys, trust store",
                       description="Create a device folder. With --package the first model is installed, so the "
                                   "device serves from first boot with no network.")
    p.add_argument("--dir", required=True, type=Path, help="device folder to create")
    p.add_argument("--device-id", required=True, help="device id (letters, digits, '_', '.', '-')")
    p.add_argument("--target", required=True, help="hardware target profile name (see hardware/targets)")
    p.add_argument("--root-key", required=True, type=Path, help="root public key to pin (keys/root.pub)")
    p.add_argument("--fleet-key", required=True, type=Path, help="fleet public key to pin (desired-state commands)")
    p.add_argument("--fleet", default="default", help="fleet name (default: default)")
    p.add_argument("--broker", default="", help="mqtt://HOST:PORT or mqtts://HOST:PORT (empty: offline device)")
    p.add_argument("--server", default="", help="http://HOST:PORT of the fleet server")
    p.add_argument("--tag", dest="tags", type=_tag, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="cohort tags, e.g. --tag site=ward-3 ring=canary")
    p.add_argument("--package", type=Path, help="first model package to install")
    p.add_argument("--force", action="store_true", help="replace an existing device folder (new device key)")
    p.set_defaults(func=_provision)


def _provision(args: argparse.Namespace) -> int:
    from .provision import ProvisionRequest, provision

    res = provision(ProvisionRequest(
        directory=args.dir, device_id=args.device_id, target=args.target, root_key=args.root_key,
        fleet_key=args.fleet_key, fleet=args.fleet, broker=args.broker, server=args.server, tags=dict(args.tags),
        package=args.package, force=args.force,
    ))
    c = res.config
    print(f"provisioned device {c.device_id} (fleet {c.fleet}, target {c.target}) in {res.device.path}")
    print(f"device key {res.device_key_id[:16]}: enrol {res.device.device_pub} on the fleet server")
    if res.install is not None:
        print(f"first model: {res.install.message}")
    else:
        print("no model yet: install one with `device-agent install PKG --dir ...` or a rollout")
    return 0


# ---- install / rollback -------------------------------------------------------------------------------
def _add_install(sub: Any) -> None:
    p = sub.add_parser("install", help="verify, smoke-test and activate a package file (no network)")
    p.add_argument("package", type=Path, help="package file (.efpkg)")
    p.add_argument("--dir", required=True, type=Path, help="device folder")
    p.set_defaults(func=_install)


def _add_rollback(sub: Any) -> None:
    p = sub.add_parser("rollback", help="switch back to the model in the standby slot (no download)")
    p.add_argument("--dir", required=True, type=Path, help="device folder")
    p.add_argument("--reason", default="operator_request", help="short token recorded with the rollback")
    p.set_defaults(func=_rollback)


def _report(result: InstallResult) -> int:
    if result.ok:
        print(f"{result.status}: {result.message}")
        return 0
    print(f"device-agent: {result.status} ({result.reason}): {result.message}", file=sys.stderr)
    return 1


def _install(args: argparse.Namespace) -> int:
    from .updater import Updater

    return _report(Updater(DeviceDir(args.dir)).install(args.package))


def _rollback(args: argparse.Namespace) -> int:
    from .updater import Updater

    return _report(Updater(DeviceDir(args.dir)).rollback(args.reason))


# ---- status -------------------------------------------------------------------------------------------
def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="what the device runs, its update state, outbox, link, k and the running "
                                      "agent's counters (the fields of GET /v1/status and more)")
    p.add_argument("--dir", required=True, type=Path, help="device folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _model(d: dict[str, Any] | None) -> str:
    return "none" if d is None else f"{d['name']} {d['version']} (slot {d['slot']})"


def _what(result: dict[str, Any]) -> str:
    if result.get("name"):
        return f"{result['name']} {result.get('version')}"
    return Path(result["package"]).name if result.get("package") else "-"


def _privacy(doc: dict[str, Any]) -> str:
    eps, spent = doc["dp_epsilon"], doc["dp_epsilon_spent"]
    noise = "no noise (dp_epsilon 0)" if not eps else (
        f"dp_epsilon {eps:g} per window, {'unreadable' if spent < 0 else f'{spent:g}'} spent")
    return f"k {doc['k']} (windows below k are held and merged forward); {noise}"


def _agent(doc: dict[str, Any]) -> str:
    agent = doc["agent"]
    if agent["state"] != "running" or doc["predictions"] is None:
        return f"{agent['state'].replace('_', ' ')}: {agent['detail']}"
    rejected = sum((doc["rejected"] or {}).values())
    return (f"running (pid {agent['pid']}, {agent['url']}): {doc['predictions']} predictions, {rejected} rejected, "
            f"{doc['windows_closed']} windows closed, {doc['summaries_emitted']} summaries, "
            f"{doc['windows_held_for_k']} held below k{_disk_full(doc)}")


def _disk_full(doc: dict[str, Any]) -> str:
    """What a full disk did since the agent started (``windows_held_disk_full``, the outbox's ``disk_full``,
    ``windows_lost``), or "" when it never happened: a full disk must not hide behind "0 queued"."""
    outbox = doc.get("outbox") or {}
    held, lost = doc.get("windows_held_disk_full") or 0, doc.get("windows_lost") or 0
    failed = outbox.get("disk_full", 0)
    closed = outbox.get("open") == 0
    if not (held or failed or lost or closed):
        return ""
    parts = [f"{held} windows held in memory until space frees", f"{failed} outbox writes failed for lack of space"]
    if closed:
        parts.append("outbox not open")
    if lost:
        parts.append(f"{lost} windows LOST")
    return f"; {'DISK FULL' if held or closed else 'disk was full'}: " + ", ".join(parts)


def _status(args: argparse.Namespace) -> int:
    doc = status_doc(DeviceDir(args.dir))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    last = doc["last_result"]
    link = doc["link"]
    link_text = link["state"] + (f" ({link['detail']})" if link.get("detail") else "")
    if link.get("since"):
        link_text += f" since {link['since']}"
    if link.get("last_error"):
        link_text += f"; last error: {link['last_error']}"
    depth = doc["outbox_depth"]
    lines = [
        f"device    {doc['device_id']}  fleet {doc['fleet']}  target {doc['target']}",
        f"active    {_model(doc['active'])}",
        f"standby   {_model(doc['standby'])}",
        f"update    {doc['update']['state']}",
        "last      " + ("none" if last is None else f"{last['status']} ({last['reason']}) {_what(last)} at "
                        f"{last['at']}: {last['message']}"),
        f"outbox    {'unreadable' if depth is None else depth} queued",
        f"link      {link_text}",
        f"privacy   {_privacy(doc)}",
        f"agent     {_agent(doc)}",
    ]
    lines += [f"recovered {a}" for a in doc["recovered"]]
    print("\n".join(lines))
    return 0


# ---- entry point --------------------------------------------------------------------------------------
def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run the agent: local HTTP API, summaries, MQTT link (systemd runs this)")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--http-port", type=int, help="override config http_port (0 picks a free port)")
    p.add_argument("--no-http", action="store_true", help="no local HTTP API (summaries and link only)")
    p.set_defaults(func=_run)


class ListenError(AgentError):
    """The local API cannot listen on its address (a port in use, a host that does not resolve)."""

    reason = "http_listen"


class InstanceError(AgentError):
    """Another ``run`` or ``serve`` already runs on this device folder."""

    reason = "already_running"


INSTANCE_LOCK = "agent.lock"


def _hold_instance(device: DeviceDir, command: str) -> contextlib.ExitStack:
    """Take ``<dir>/agent.lock`` (``pid_lock``) so that one ``run`` or ``serve`` at a time uses a device folder: two
    would share its MQTT client id (each taking the connection from the other), its outbox and its status file.
    Returns the held lock, to release with ``with``. Raises InstanceError naming the process that holds it."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(pid_lock(device.path / INSTANCE_LOCK))
    except LockHeldError as exc:
        raise InstanceError(f"another device-agent run or serve (pid {exc.holder}) is using {device.path}; stop it "
                            f"first (one agent per device folder), then start `device-agent {command}`") from None
    return held


def _run(args: argparse.Namespace) -> int:
    from .runner import DeviceRunner

    device = DeviceDir(args.dir)
    cfg = device.load_config()
    with _hold_instance(device, "run"):
        port = args.http_port if args.http_port is not None else cfg.http_port
        key = "--http-port" if args.http_port is not None else f"http_host, http_port in {device.config_file}"
        where = f"the local API cannot listen on {cfg.http_host}:{port} ({key})"
        if not args.no_http:
            _check_listen(cfg.http_host, port, where)
        try:
            return DeviceRunner(args.dir, http=not args.no_http, http_port=args.http_port).run()
        except SystemExit as exc:
            if exc.code in (0, None):
                raise
            # uvicorn exits 3 (its STARTUP_FAILURE) when it cannot bind: a race with another process since the
            # check above, or an address the check could not foresee. Its own log line above says why.
            raise ListenError(f"{where}: the server did not start (see the error above)") from None


def _check_listen(host: str, port: int, where: str) -> None:
    """Bind ``host:port`` as uvicorn will (SO_REUSEADDR) and let it go, so a busy port or an unknown host is one
    clear error naming the key before the agent starts. Raises ListenError. Port 0 (any free port) always works."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"{where}: http_host does not resolve ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(f"{where}: port {port} is in use (another device-agent run?)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ListenError(f"{where}: {host} is not an address of this machine") from None
            if exc.errno == errno.EACCES:
                raise ListenError(f"{where}: not allowed to listen on port {port} (below 1024 needs root)") from None
            raise ListenError(f"{where}: {exc.strerror or exc}") from None


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="predict one input from a file (.json features/list, .npy, or an image)")
    p.add_argument("input", type=Path)
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import json
    import pickle

    import numpy as np

    from .agent import Agent

    path: Path = args.input
    if not path.exists():
        raise AgentError(f"input {path} does not exist")
    item: Any
    if path.suffix == ".json":
        try:
            item = json.loads(path.read_text())
        except ValueError as exc:
            raise AgentError(f"{path} is not JSON: {exc}") from None
    elif path.suffix == ".npy":
        try:
            item = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, pickle.UnpicklingError) as exc:  # an object array, a damaged header
            raise AgentError(f"{path} is not a readable .npy array of numbers ({exc}); np.save writes one") from None
        if not isinstance(item, np.ndarray):  # an .npz archive named .npy
            item.close()
            raise AgentError(f"{path} is not a readable .npy array of numbers (it is an .npz archive); np.save "
                             "writes one") from None
    elif path.suffix.lower() in (".csv", ".tsv", ".txt", ".parquet", ".npz"):
        raise AgentError(f"{path}: predict takes one input (a .json row, a .npy array or an image file); for a "
                         f"file of many rows use `device-agent batch --dir {args.dir} --input {path} --store "
                         "KV.sqlite`")
    else:
        item = path.read_bytes()
    agent = Agent.open(args.dir, background=False)
    try:
        p = agent.predict(item)
    finally:
        agent.close()
    if args.json:
        print(json.dumps(p.to_dict()))
    else:
        print(f"{p.label} (confidence {p.confidence:.3f}) by {p.model} {p.version} in {p.latency_ms:.3f} ms "
              f"[{p.prediction_id}]")
    return 0


def _add_batch(sub: Any) -> None:
    p = sub.add_parser("batch", help="precompute predictions into a key-value store the local API serves by key")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path, help=".csv with a key column, .npz, or an image folder")
    p.add_argument("--store", required=True, type=Path, help="SQLite key-value file")
    p.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    from .agent import Agent
    from .batch import KVStore, run_batch

    store = KVStore(args.store)  # before the agent: a store that cannot be opened costs no predictions
    agent = Agent.open(args.dir, background=False)
    try:
        counts = run_batch(agent, args.input, store, report=lambda m: print(f"device-agent: {m}", file=sys.stderr))
    finally:
        agent.close()
    skipped = f"; {counts['skipped']} rows not predicted, told above" if counts.get("skipped") else ""
    print(f"stored {counts['stored']} predictions in {args.store} ({counts['rejected']} rejected inputs recorded"
          f"{skipped})")
    return 0


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="real-time prediction service with several uvicorn workers (server pattern)")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--host", help="address to bind (default: the device's config.toml http_host)")
    p.add_argument("--port", type=int, help="port to bind (default: the device's config.toml http_port)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--store", type=Path, help="batch key-value store to serve under /v1/precomputed/KEY")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:

    import uvicorn

    from . import worker_stats

    device = DeviceDir(args.dir)
    cfg = device.load_config()  # fail early with a clear error
    # The local API's address is the device's, as `run` binds it; the flags override it for this service only.
    args.host = cfg.http_host if args.host is None else args.host
    args.port = cfg.http_port if args.port is None else args.port
    if args.store and not args.store.is_file():  # KVStore would create an empty one: every key a 404
        raise AgentError(f"--store {args.store} does not exist; `device-agent batch --dir {args.dir} --input DATA "
                         f"--store {args.store}` writes it")
    from .runner import local_url

    url = local_url(args.host, args.port)  # the worker holding the link records it in agent.json (status)
    with _hold_instance(device, "serve"):  # by this, the parent of the workers, for as long as they serve
        worker_stats.reset(device.path)  # the service's counters start at 0, as one process's do
        os.environ["EDGEFLEET_DEVICE_DIR"] = str(args.dir.resolve())
        if url:
            os.environ["EDGEFLEET_SERVE_URL"] = url
        if args.store:
            os.environ["EDGEFLEET_KV_STORE"] = str(args.store.resolve())
        uvicorn.run("device_agent.http_api:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=max(1, args.workers), log_level="warning", access_log=False)
    return 0


REGISTRARS: tuple[Callable[[Any], None], ...] = (_add_provision, _add_install, _add_rollback, _add_status, _add_run,
                                                 _add_predict, _add_batch, _add_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device-agent", description="edgefleet on-device agent")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every update transition")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_usage(sys.stderr)
        print("device-agent: error: choose a command", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="device-agent: %(message)s")
    # Nothing the agent writes (slots, models, logs, outbox) is group- or world-writable, whatever umask it was
    # started with (an installer's `umask 000` made every slot file 0666); the keys are 0600 regardless.
    os.umask(os.umask(0o022) | 0o022)
    try:
        return int(args.func(args))
    except (AgentError, ContractError) as exc:
        print(f"device-agent: error ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"device-agent: error (io_error): {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a foreign error not yet translated: still one line and status 1
        logging.getLogger("edgefleet.agent").info("device-agent %s failed", args.command, exc_info=True)
        text = " ".join(str(exc).split())[:300]
        print(f"device-agent: error (internal): {type(exc).__name__}: {text} (a bug in device-agent; -v shows "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
