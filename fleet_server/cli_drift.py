"""`fleet-server drift` and `fleet-server alerts`: work directly on the data folder's SQLite (server up or down).

    fleet-server drift NAME [--version V] [--by TAG ...] [--since 24h] [--until T] [--devices compact|full|none]
                            --data DIR [--json]
    fleet-server alerts list [--state open|acknowledged|resolved|active] [--model M] --data DIR [--json]
    fleet-server alerts ack ID [--by NAME] --data DIR
    fleet-server alerts resolve ID [--by NAME] --data DIR
    fleet-server alerts rules NAME [--set JSON | --reset] --data DIR
    fleet-server alerts evaluate --data DIR [--no-deliver] [--no-hooks] [--json]   (one pass now, e.g. from cron)
    fleet-server alerts events [--kind K] [--model M] [--limit N] --data DIR [--json]

Both read ``--data DIR/server.toml`` when the folder holds one, through ``cli_common._settings`` as every other
command does: they run with the settings ``serve`` runs with (its flags aside; ``alerts evaluate`` delivers with
them), and a server.toml that is not valid (not TOML; a bad, misplaced or unknown ``[storage]`` key) stops them
with the error ``serve`` gives: one line naming the file, the key and the rule, exit status 1 (as from every
command, so a broken file reads the same from all of them; 2 stays argparse's usage error). A folder holding only
``fleet.sqlite`` (a copy of the database, a test fleet) runs with the default settings: these commands need
nothing else from it. Alert rules are per model, in the database (``alerts rules``), not in server.toml.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from . import alerts, health, retraining
from .cli_common import _data, _settings_or_defaults
from .errors import ConfigError, RequestError
from .settings import ServerSettings
from .store import Store

__all__ = ["add_alert_commands", "add_drift_commands", "run_alerts", "run_drift"]


def _open(args: argparse.Namespace) -> tuple[ServerSettings, Store]:
    """The data folder's settings (server.toml when present, see the module docstring) and its database.
    ConfigError when server.toml is not valid or the database is missing."""
    settings = _settings_or_defaults(args)
    if not settings.db_path.exists():
        raise ConfigError(f"{args.data} holds no fleet database ({settings.db_path.name} is missing); pass the "
                          "server's --data folder (see `fleet-server init`)")
    return settings, Store(settings.db_path)


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.2g}" if p < 0.01 else f"{p:.3f}")


def _v(x: object) -> str:
    """A value of the report as printed: ``-`` for None (no data in the range)."""
    return "-" if x is None else str(x)


def _scope_text(title: str, h: dict[str, Any], top: int = 5) -> list[str]:
    idr, od, ops, acc, dq = h["input_drift"], h["output_drift"], h["operations"], h["accuracy"], h["data_quality"]
    win = h.get("window") or {}
    lines = [f"{title}: {h['devices']} device(s), {h['summaries']} summaries, {h['count']} predictions"
             f" [{win.get('start', '-')} .. {win.get('end', '-')}]"]
    verdict = f"DRIFT on {', '.join(idr['drifted_features'])}" if idr["drifted"] else "no drift"
    noise = idr.get("noise_variance") or 0
    lines.append(f"  input drift   {verdict} ({idr['statistic']}, {idr['correction']}, alpha {idr['alpha']}"
                 + (f"; DP noise variance {noise:g} per count" if noise else "") + ")")
    for f in idr["features"][:top]:
        lines.append(f"    {f['feature']:<28} {f['verdict']:<12} stat {f['statistic']:.3f}  "
                     f"p_adj {_fmt_p(f['p_adjusted'])}  psi {f['psi']:.3f}  n {f['n']}"
                     + (f"  n_effective {f['n_effective']:g}" if "n_effective" in f else ""))
    cm = od["class_mix"]
    lines.append(f"  output drift  {'DRIFT' if od['drifted'] else 'no drift'} (class mix w {_v(cm['cohens_w'])}, "
                 f"p_adj {_fmt_p(cm['p_adjusted'])}; confidence ks {_v(od['confidence']['ks'])}, "
                 f"p_adj {_fmt_p(od['confidence']['p_adjusted'])})")
    lat = ops["latency_ms"]
    rate = ops["error_rate"]
    lines.append(f"  operations    p50 {_v(lat['p50'])} ms  p95 {_v(lat['p95'])} ms  p99 {_v(lat['p99'])} ms  "
                 f"error rate {'-' if rate is None else f'{rate:.2%}'}")
    meas = acc["measured"]
    trust = "trustworthy" if acc["trustworthy"] else "NOT trustworthy"
    empty = acc["empty_bin_share"]
    lines.append(f"  accuracy      estimated {_v(acc['estimated'])} ({trust}, "
                 f"{'-' if empty is None else f'{empty:.1%}'} in reference-empty bins)"
                 + (f"  measured {meas['accuracy']} on {meas['labels']} labels" if meas else "")
                 + f"  reference {acc['reference']}")
    if dq["flagged"]:
        lines.append("  data quality  " + "; ".join(f"{i['signal']} {i['rate']:.2%} on {i['feature'] or 'requests'}"
                                                    for i in dq["issues"][:5]))
    else:
        lines.append("  data quality  ok")
    return lines


def _report_text(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} {r['version']}  {r['since']} .. {r['until']}  (reference: {r['reference_rows']} rows)"]
    if r.get("version_chosen", "given") != "given":
        lines.append(f"  version {r['version']}: {r['version_chosen']} (--version to choose another)")
    lines += _scope_text("fleet", r["fleet"])
    for value, h in (r.get("cohorts") or {}).items():
        lines += _scope_text(f"{r['by']}={value}", h, top=3)
    for key, cohorts in (r.get("cohorts_by") or {}).items():
        for value, h in cohorts.items():
            lines += _scope_text(f"{key}={value}", h, top=3)
    devs = r.get("devices") or []
    if devs:
        lines.append(f"devices (worst first, {len(devs)}):")
        for d in devs[:20]:
            idr = d["input_drift"]
            lines.append(f"  {d['device_id']:<24} {d['count']:>8} pred  drift: "
                         f"{', '.join(idr['drifted_features']) or '-'}  p95 "
                         f"{_v((d.get('operations') or {}).get('p95_ms'))}")
    return "\n".join(lines)


def run_drift(args: argparse.Namespace) -> int:
    """`fleet-server drift NAME ...`: print the health report. Returns 0, or 3 when anything drifted."""
    _, store = _open(args)
    try:
        rules = alerts.rules_for(store, args.name)
        r = health.report(store, args.name, args.version, since=args.since, until=args.until, by=args.by,
                          policy=rules.health, devices=args.devices)
    finally:
        store.close()
    print(json.dumps(r, indent=2) if args.json else _report_text(r))
    scopes = [r["fleet"], *(r.get("cohorts") or {}).values(),
              *(h for cohorts in (r.get("cohorts_by") or {}).values() for h in cohorts.values())]
    return 3 if any(s["input_drift"]["drifted"] or s["output_drift"]["drifted"] for s in scopes) else 0


def _alert_line(a: dict[str, Any]) -> str:
    d = a["delivery"]
    return (f"{a['id']:>5}  {a['state']:<12} {a['severity']:<8} {a['kind']:<15} opened {a['created']}  "
            f"updated {a['updated']}  delivery {d['state']} ({d['attempts']})  {a['summary']}")


def run_alerts(args: argparse.Namespace) -> int:
    """`fleet-server alerts ...`. Returns 0; errors raise FleetError (the caller prints them)."""
    settings, store = _open(args)
    try:
        cmd = args.alerts_cmd
        if cmd == "list":
            rows = alerts.list_alerts(store, args.state, args.model, args.limit)
            print(json.dumps(rows, indent=2) if args.json else "\n".join(map(_alert_line, rows)) or "no alerts")
        elif cmd in ("ack", "resolve"):
            fn = alerts.acknowledge if cmd == "ack" else alerts.resolve
            print(_alert_line(fn(store, args.id, args.by or getpass.getuser())))
        elif cmd == "rules":
            if args.set is not None and args.reset:
                raise RequestError("use --set JSON or --reset, not both")
            if args.set is not None or args.reset:
                try:
                    doc = {} if args.reset else json.loads(args.set)
                except ValueError as exc:
                    raise RequestError(f"--set is not JSON: {exc}") from None
                if not isinstance(doc, dict):
                    raise RequestError("--set must be a JSON object, e.g. '{\"latency_p95\": {\"max_p95_ms\": 50}}'")
                print(json.dumps(alerts.set_rules(store, args.name, doc), indent=2))
            else:
                print(json.dumps(alerts.rules_for(store, args.name).to_dict(), indent=2))
        elif cmd == "evaluate":
            return _evaluate(settings, store, args)
        elif cmd == "events":
            ev = retraining.events(store, args.kind, args.model, args.limit)
            print(json.dumps(ev, indent=2) if args.json else "\n".join(
                f"{e['id']:>6}  {e['at']}  {e['kind']:<22} {e['subject']:<20} {json.dumps(e['detail'])[:120]}"
                for e in ev) or "no events")
    finally:
        store.close()
    return 0


def _evaluate(settings: ServerSettings, store: Store, args: argparse.Namespace) -> int:
    from .routes_drift import DriftService

    svc = DriftService(settings, store)
    res = svc.run_once()
    out: dict[str, Any] = {"opened": res.opened, "updated": res.updated, "resolved": res.resolved,
                           "versions": res.versions, "scopes": res.scopes, "errors": res.errors,
                           "seconds": round(res.seconds, 3)}
    if not args.no_hooks:
        out["hooks_run"] = svc.run_pending_hooks()
    if not args.no_deliver:
        out["delivery"] = svc.deliver_once()
    print(json.dumps(out, indent=2) if args.json else
          f"evaluated {res.versions} version(s), {res.scopes} scope(s) in {res.seconds:.2f} s: "
          f"{len(res.opened)} opened, {len(res.updated)} still open, {len(res.resolved)} resolved"
          + (f"; delivery {out['delivery']}" if "delivery" in out else "")
          + ("".join(f"\n  error: {e}" for e in res.errors)))
    return 0


def add_drift_commands(sub: Any) -> None:
    """Add `drift` to the `fleet-server` subcommands (dispatch through ``args.func``)."""
    p = sub.add_parser("drift", help="drift and health of a model version: fleet, cohorts, devices",
                       epilog="exit status: 0 healthy, 3 input or output drift in the fleet or a cohort, 1 error")
    p.add_argument("name", help="model name")
    p.add_argument("--version", help="model version (default: the one with the most summaries in the range, else "
                   "the newest published)")
    p.add_argument("--by", action="append", help="also per value of this device tag (cohorts); repeatable")
    p.add_argument("--since", help="ISO time or duration back from now such as 24h, 7d (default 24h)")
    p.add_argument("--until", help="ISO time or duration back from now (default now)")
    p.add_argument("--devices", default="compact", choices=["compact", "full", "none"])
    _data(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_drift)


def add_alert_commands(sub: Any) -> None:
    """Add `alerts {list,ack,resolve,rules,evaluate,events}` to the `fleet-server` subcommands."""
    a = sub.add_parser("alerts", help="drift and health alerts, their rules and delivery")
    asub = a.add_subparsers(dest="alerts_cmd", required=True)
    p = asub.add_parser("list", help="alerts, newest first")
    p.add_argument("--state", choices=[*alerts.STATES, "active"])
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=200)
    _data(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_alerts)
    for name, text in (("ack", "acknowledge an alert"), ("resolve", "resolve an alert by hand")):
        p = asub.add_parser(name, help=text)
        p.add_argument("id", type=int)
        p.add_argument("--by", help="who (default: the OS user)")
        _data(p)
        p.set_defaults(func=run_alerts)
    p = asub.add_parser("rules", help="show or set a model's alert rules (overrides of the defaults)")
    p.add_argument("name")
    p.add_argument("--set", help="JSON overrides, replacing earlier ones, e.g. '{\"input_drift\": {\"alpha\": 0.001}}'")
    p.add_argument("--reset", action="store_true", help="back to the defaults")
    _data(p)
    p.set_defaults(func=run_alerts)
    p = asub.add_parser("evaluate", help="one evaluation, retraining check and delivery pass now")
    _data(p)
    p.add_argument("--no-deliver", action="store_true")
    p.add_argument("--no-hooks", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_alerts)
    p = asub.add_parser("events", help="retraining, hook and alert events, newest first")
    p.add_argument("--kind", help=f"only this kind: {', '.join(retraining.EVENT_KINDS)} (another is refused)")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=50)
    _data(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_alerts)
