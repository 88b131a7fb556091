"""How `fleet-server` commands get their settings: the bounded-storage table (fleet_server/settings.py) that the
ServerSettings fields, server.toml's [storage] keys, the `serve`/`housekeeping` flags and the `housekeeping`
printout are all made from; and `drift` and `alerts` reading the data folder's server.toml as `serve` does.
Real data folders (the published clinical package, a real SQLite) and the real CLI entry point throughout."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet_server import routes_drift
from fleet_server.cli import build_parser
from fleet_server.cli_common import _number
from fleet_server.settings import (
    STORAGE,
    STORAGE_SETTINGS,
    ServerSettings,
    StorageSetting,
    _collect_storage,
    _finite,
    _storage,
    storage_rule_broken,
    storage_table,
)
from tests.fleet_server.conftest import FleetFactory, run_cli


def options(command: str) -> dict[str, argparse.Action]:
    """The options of a `fleet-server` subcommand, by flag."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: a for a in sub.choices[command]._actions for flag in a.option_strings}


# ---- one table ------------------------------------------------------------------------------------------------
def test_every_storage_setting_is_a_field_a_storage_key_and_a_flag_of_serve_and_housekeeping(tmp_path: Path) -> None:
    defaults = ServerSettings(data_dir=tmp_path)
    assert STORAGE_SETTINGS == tuple(s.name for s in STORAGE) == (
        "quarantine_max_rows", "quarantine_max_payload_mb", "summary_retention_days", "housekeeping_interval_seconds",
        "housekeeping_chunk_rows")
    for command in ("serve", "housekeeping"):
        flags = options(command)
        for s in STORAGE:
            value = getattr(defaults, s.name)
            assert value == s.default and type(value) is s.kind, s  # the field: its default and type
            assert storage_table({s.name: s.default}, "f") == {s.name: s.default}  # a [storage] key
            assert storage_rule_broken(s.name, -1) is not None  # with a rule
            flag = flags[s.flag]  # a flag, spelled with dashes
            assert (flag.dest, flag.type, flag.metavar) == (s.name, s.kind, s.unit), (command, s)
            assert flag.help == (f"{s.help} (for this run; else [storage] {s.name} in server.toml, else "
                                 f"{_number(s.default)})"), (command, s)


def test_a_storage_flag_parses_to_its_kind_and_is_held_to_its_rule(make_fleet: FleetFactory) -> None:
    data = make_fleet().settings.data_dir
    (data / "server.toml").write_text('fleet = "fleet-a"\n')
    for s in STORAGE:
        args = build_parser().parse_args(["housekeeping", "--data", str(data), s.flag, "1"])
        assert getattr(args, s.name) == 1 and type(getattr(args, s.name)) is s.kind

    rc, out, err = run_cli(["housekeeping", "--data", str(data), "--housekeeping-chunk-rows", "10001"])

    assert rc == 1 and out == ""
    assert err == ("fleet-server: error: housekeeping_chunk_rows (--housekeeping-chunk-rows) must be a whole number "
                   "from 1 to 10,000, not 10001\n")


def test_the_housekeeping_command_prints_every_setting_that_bounds_a_pass_in_table_order(
        make_fleet: FleetFactory) -> None:
    fleet = make_fleet()
    conf = fleet.settings.data_dir / "server.toml"
    conf.write_text('fleet = "fleet-a"\n\n[storage]\nsummary_retention_days = 0\n')

    rc, out, err = run_cli(["housekeeping", "--data", str(fleet.settings.data_dir), "--quarantine-max-rows", "9"])

    assert rc == 0, err
    shown = [s for s in STORAGE if s.per_pass]
    assert [s.name for s in STORAGE if not s.per_pass] == ["housekeeping_interval_seconds"]  # serve's alone
    source = {"quarantine_max_rows": "flag --quarantine-max-rows", "summary_retention_days": f"file {conf}"}
    value = {"quarantine_max_rows": "9", "summary_retention_days": "0"}
    assert out.splitlines()[:1 + len(shown)] == ["housekeeping bounds:", *(
        f"  {s.name} = {value.get(s.name, _number(s.default))} ({source.get(s.name, 'default')})" for s in shown)]


def test_a_storage_setting_is_one_declaration() -> None:
    """What a sixth setting takes: one ``_storage`` field. Its row (name, flag, kind, default, unit, help, rule)
    is collected from that declaration alone."""

    @dataclass(frozen=True)
    class Wider(ServerSettings):
        quarantine_max_age_days: float = _storage(30.0, "DAYS", "days quarantine rows are kept", _finite())

    *same, extra = _collect_storage(Wider)
    assert tuple(same) == STORAGE
    assert extra == StorageSetting(name="quarantine_max_age_days", kind=float, default=30.0, unit="DAYS",
                                   help="days quarantine rows are kept", rule=extra.rule)
    assert extra.flag == "--quarantine-max-age-days" and extra.per_pass
    assert extra.rule(-1.0) == "a finite number, 0 or more" and extra.rule(2) is None


def test_a_storage_declaration_whose_default_disagrees_with_its_type_is_refused() -> None:
    @dataclass(frozen=True)
    class Wrong(ServerSettings):
        quarantine_max_age_days: float = _storage(30, "DAYS", "days", _finite())  # an int default for a float

    with pytest.raises(TypeError, match="quarantine_max_age_days: annotated <class 'float'>, default 30"):
        _collect_storage(Wrong)


# ---- drift and alerts read server.toml -------------------------------------------------------------------------
DRIFT_AND_ALERTS = [["drift", "clinical"], ["alerts", "list"], ["alerts", "ack", "1"], ["alerts", "resolve", "1"],
                    ["alerts", "rules", "clinical"], ["alerts", "evaluate", "--no-deliver"], ["alerts", "events"]]
BROKEN = [  # server.toml's text after `fleet = ...`, and what the error must say after the file's name
    ("[storage\n", " is not valid TOML: "),
    ("[storage]\nsummary_retention_days = 0.5\n", ": [storage] summary_retention_days must be 0 (keep forever) or "
                                                  "at least 1 day"),
    ("[storage]\nsummary_retention_day = 0\n", ": unknown key in [storage]: summary_retention_day (did you mean "
                                               "summary_retention_days?)"),
]


@pytest.mark.parametrize(("text", "says"), BROKEN, ids=["not-toml", "bad-value", "unknown-key"])
def test_drift_and_alerts_refuse_a_broken_server_toml_naming_the_file_and_the_problem(
        make_fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch, text: str, says: str) -> None:
    """As ``serve`` and every other command: exit status 1, the error on one line, no traceback, nothing run."""
    served: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: served.append(s) or 0)  # it would run until stopped
    fleet = make_fleet()
    conf = fleet.settings.data_dir / "server.toml"
    conf.write_text(f'fleet = "fleet-a"\n\n{text}')

    for command in DRIFT_AND_ALERTS:
        rc, out, err = run_cli([*command, "--data", str(fleet.settings.data_dir)])
        assert (rc, out) == (1, ""), (command, out, err)
        assert err.startswith(f"fleet-server: error: {conf}{says}") and "Traceback" not in err, (command, err)
        assert len(err.splitlines()) == 1, (command, err)
    assert fleet.store.one("SELECT COUNT(*) FROM alerts")[0] == 0  # evaluate refused before it evaluated
    rc, _, err = run_cli(["serve", "--data", str(fleet.settings.data_dir), "--broker", "none"])
    assert rc == 1 and err.startswith(f"fleet-server: error: {conf}{says}") and not served  # the error serve gives


def capture_drift_settings(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    """The settings `alerts evaluate` builds its (real) DriftService with."""
    seen: list[ServerSettings] = []

    class Observed(routes_drift.DriftService):
        def __init__(self, settings: ServerSettings, store: Any, **kw: Any) -> None:
            seen.append(settings)
            super().__init__(settings, store, **kw)

    monkeypatch.setattr(routes_drift, "DriftService", Observed)
    return seen


def test_alerts_evaluate_runs_with_the_settings_serve_reads_from_server_toml(
        make_fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = make_fleet()
    data = fleet.settings.data_dir
    (data / "server.toml").write_text('fleet = "ward-3"\n\n[storage]\nsummary_retention_days = 0\n')
    evaluated = capture_drift_settings(monkeypatch)
    served: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: served.append(s) or 0)

    rc, out, err = run_cli(["alerts", "evaluate", "--no-deliver", "--data", str(data)])
    assert rc == 0 and out.startswith("evaluated "), err
    assert run_cli(["serve", "--data", str(data), "--broker", "none"])[0] == 0

    [s], [served_with] = evaluated, served
    assert (s.fleet, s.summary_retention_days) == ("ward-3", 0.0)
    assert (s.fleet, s.data_dir, [getattr(s, n) for n in STORAGE_SETTINGS]) == (
        served_with.fleet, served_with.data_dir, [getattr(served_with, n) for n in STORAGE_SETTINGS])


def test_drift_and_alerts_still_work_on_a_bare_folder_holding_only_the_database(
        make_fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_fleet().settings.data_dir
    # no server.toml (keys/ may hold the keyset the registry keeps since publishing; these commands never read it)
    assert (data / "fleet.sqlite").is_file() and not (data / "server.toml").exists()
    evaluated = capture_drift_settings(monkeypatch)

    assert run_cli(["drift", "clinical", "--data", str(data)])[0] in (0, 3)
    rc, out, err = run_cli(["alerts", "list", "--data", str(data)])
    assert (rc, out) == (0, "no alerts\n"), err
    assert run_cli(["alerts", "evaluate", "--no-deliver", "--data", str(data)])[0] == 0
    assert evaluated == [ServerSettings(data_dir=data)]  # the defaults
    rc, _, err = run_cli(["drift", "clinical", "--data", str(data / "missing")])
    assert rc == 1 and "holds no fleet database (fleet.sqlite is missing)" in err
