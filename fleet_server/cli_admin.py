"""`fleet-server` commands that administer the data folder: tokens (create, list, revoke), backup, housekeeping."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.timeutil import parse_duration

from .auth import create_token, list_tokens, revoke_token, token_id, token_name_rule_broken
from .cli_common import _data, _number, _print, _settings, _settings_and_sources, _storage, _storage_flags
from .errors import ConfigError
from .settings import STORAGE
from .store import Store

__all__ = ["add_admin_commands"]


def _backup(args: argparse.Namespace) -> int:
    from .backup import backup

    doc = backup(_settings(args), Path(args.to))
    rows = doc["rows"]
    print(f"backed up {args.data} to {args.to}: {rows.get('devices', 0)} devices, {rows.get('summaries', 0)} "
          f"summaries, {len(doc['packages'])} packages, keys and server.toml (checked; see backup.json)")
    return 0


def _housekeeping(args: argparse.Namespace) -> int:
    from .health import fmt_epoch
    from .housekeeping import HousekeepingService

    s, sources = _settings_and_sources(args, **_storage(args))
    # First, so a cron log shows which bounds this pass enforced and why, even if the pass fails. Settings that do
    # not bound a pass (per_pass False: the interval between passes, serve's alone) are left out.
    print("housekeeping bounds:")
    for setting in STORAGE:
        if setting.per_pass:
            print(f"  {setting.name} = {_number(getattr(s, setting.name))} ({sources[setting.name]})")
    sys.stdout.flush()
    store = Store(s.db_path)
    try:
        r = HousekeepingService(s, store).run_once()
    finally:
        store.close()
    before = ("kept forever" if r.summaries_cutoff is None else
              "received before " + fmt_epoch(r.summaries_cutoff))
    print(f"housekeeping: evicted {r.quarantine_rows_evicted} quarantine rows and {r.quarantine_payloads_evicted} "
          f"payloads ({r.quarantine_bytes_freed} bytes); pruned {r.summaries_pruned} summaries ({before}); "
          f"{r.transactions} transactions")
    return 0


# ---- tokens ------------------------------------------------------------------------------------------------
def _tokens_create(args: argparse.Namespace) -> int:
    s = _settings(args)
    ttl = None
    if args.ttl is not None:
        try:
            ttl = parse_duration(args.ttl).total_seconds()
        except SchemaError as exc:
            raise ConfigError(f"--ttl: {exc}") from None
        if ttl < 1:
            raise ConfigError(f"--ttl {args.ttl!r} must be at least 1s (omit --ttl for a token that never expires)")
    broken = token_name_rule_broken(args.name or "")
    if broken is not None:
        raise ConfigError(f"--name {args.name!r} must {broken}")
    store = Store(s.db_path)
    token = create_token(store, args.role, args.name or "", ttl)
    print(token)
    tid = token_id(store, token)
    # The revoke command as it can be pasted: with this data folder (quoted for a POSIX shell).
    article = "an" if args.role[0] in "aeiou" else "a"
    print(f"({article} {args.role} token, id {tid}; shown once — store it as a secret; revoke it with "
          f"`fleet-server tokens revoke {tid} --data {shlex.quote(str(args.data))}`)", file=sys.stderr)
    return 0


def _tokens_list(args: argparse.Namespace) -> int:
    def at(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))

    docs = list_tokens(Store(_settings(args).db_path))
    _print(docs, args.json, lambda ts: "\n".join(
        f"{t['id']}  {t['role']:<8} {t['state']:<8} {t['name']}  created {at(t['created'])}"
        + (f"  expires {at(t['expires'])}" if t["expires"] is not None else "") for t in ts) or "no tokens")
    return 0


def _tokens_revoke(args: argparse.Namespace) -> int:
    doc = revoke_token(Store(_settings(args).db_path), args.token)
    print(f"token {doc['id']} ({doc['role']}, {doc['name']}) is {doc['state']}")
    return 0


def add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `housekeeping`, `backup` and `tokens {create,list,revoke}` to the `fleet-server` subcommands."""
    p = sub.add_parser("housekeeping", help="run one storage housekeeping pass now: quarantine caps, summary "
                                            "retention (also runs inside `serve`)")
    _data(p)
    _storage_flags(p)
    p.set_defaults(func=_housekeeping)
    p = sub.add_parser("backup", help="copy the data folder (database, keys, packages) while the server runs")
    _data(p)
    p.add_argument("--to", required=True, help="a new folder for the backup (restore: serve with --data on it)")
    p.set_defaults(func=_backup)

    t = sub.add_parser("tokens", help="operator API tokens")
    tsub = t.add_subparsers(dest="tokens_cmd", required=True)
    p = tsub.add_parser("create")
    _data(p)
    p.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    p.add_argument("--name", help="shown by `tokens list` (default: the role); at most 64 characters, no control "
                                   "characters")
    p.add_argument("--ttl", help="lifetime such as 90d (default: no expiry)")
    p.set_defaults(func=_tokens_create)
    p = tsub.add_parser("list", help="every token's id, role, state (active, expired, revoked) and name")
    _data(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_tokens_list)
    p = tsub.add_parser("revoke", help="revoke a token at once (by its id, or by its value if that is all you have)")
    _data(p)
    p.add_argument("token", help="the token's id (from `tokens list`) or its eft_… value")
    p.set_defaults(func=_tokens_revoke)
