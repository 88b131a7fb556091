"""`fleet-server` refuses what it cannot act on, in one line naming the problem and the fix (exit status 1, no
traceback), instead of going on with a default: a server.toml entry it does not read (a typo) or a fleet that is
not a quoted string; an event kind that does not exist. Its hints can be pasted as they are (`tokens create`)."""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

import fleet_server
from fleet_server.auth import token_id
from fleet_server.settings import STORAGE, STORAGE_SETTINGS, ServerSettings
from fleet_server.store import Store
from tests.fleet_server.conftest import run_cli

KEYS = ", ".join(STORAGE_SETTINGS)
HOLDS = 'server.toml holds fleet = "NAME", http = "HOST:PORT", public_url = "URL" and a [storage] table of ' + KEYS


@pytest.fixture()
def data(cli_data: Path) -> Path:
    return cli_data


def commands(data: Path) -> list[list[str]]:
    """Commands that read server.toml, of every kind (serve is replaced by the test: it would run until stopped)."""
    return [[*c, "--data", str(data)] for c in (["serve", "--broker", "none"], ["housekeeping"], ["tokens", "list"],
                                                 ["rollout", "list"], ["alerts", "list"], ["devices", "list"])]


# ---- server.toml ----------------------------------------------------------------------------------------------
INIT = 'fleet = "default"\n'  # what `fleet-server init` writes (the fixture's folder holds exactly this)
STRAY = [  # server.toml's text, and the error after "<file>: "
    (INIT + "\n[storag]\nsummary_retention_days = 0\n",
     "unknown table [storag] (did you mean [storage]?); " + HOLDS),
    ('flet = "ward-3"\n',
     "unknown key flet (did you mean fleet?); " + HOLDS),
    (INIT + 'owner = "ml"\n[retention]\ndays = 1\n',
     "unknown key owner, table [retention]; " + HOLDS),
    (INIT + "summary_retention_day = 0\n",
     "unknown key summary_retention_day (did you mean summary_retention_days in the [storage] table?); " + HOLDS),
    ("fleet = 5\n", 'fleet must be a quoted string, like fleet = "default", not 5'),
    ("fleet = true\n", 'fleet must be a quoted string, like fleet = "default", not True'),
    ("[fleet]\nname = \"x\"\n", "fleet must be a quoted string, like fleet = \"default\", not {'name': 'x'}"),
    ('fleet = "ward 3"\n', "fleet 'ward 3' must be 1-64 characters of letters, digits, '_', '.', '-'"),
]


@pytest.mark.parametrize(("text", "says"), STRAY, ids=["table-typo", "key-typo", "two-unknown", "storage-key-typo",
                                                       "fleet-number", "fleet-bool", "fleet-table", "fleet-id"])
def test_a_server_toml_entry_that_is_not_read_or_a_fleet_that_is_not_a_string_stops_every_command(
        data: Path, monkeypatch: pytest.MonkeyPatch, text: str, says: str) -> None:
    served: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: served.append(s) or 0)
    conf = data / "server.toml"
    conf.write_text(text)

    for command in commands(data):
        rc, out, err = run_cli(command)
        assert (rc, out, err) == (1, "", f"fleet-server: error: {conf}: {says}\n"), command
    assert not served


def test_what_init_writes_and_a_full_storage_table_are_read_by_every_command(
        built: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing legitimate is refused: the file `init` writes, with the README's [storage] table holding every key."""
    served: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: served.append(s) or 0)
    data = tmp_path / "srv"
    rc, _, err = run_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub"), "--fleet", "ward-3"])
    assert rc == 0, err
    conf = data / "server.toml"
    assert conf.read_text() == 'fleet = "ward-3"\nhttp = "127.0.0.1:8480"\n'  # no public_url: derived from http
    conf.write_text(conf.read_text() + "\n[storage]\n" + "".join(f"{s.name} = {s.default}\n" for s in STORAGE))

    for command in commands(data):
        rc, _, err = run_cli(command)
        assert rc == 0, (command, err)
    assert [s.fleet for s in served] == ["ward-3"]


# ---- events ---------------------------------------------------------------------------------------------------
def test_alerts_events_refuses_a_kind_that_does_not_exist_listing_the_kinds(data: Path) -> None:
    from fleet_server.retraining import EVENT_KINDS

    rc, out, err = run_cli(["alerts", "events", "--kind", "nope", "--data", str(data)])
    assert (rc, out) == (1, "")
    assert err == f"fleet-server: error: unknown event kind 'nope'; the kinds are {', '.join(EVENT_KINDS)}\n"

    rc, _, err = run_cli(["alerts", "events", "--kind", "tokens", "--data", str(data)])
    assert rc == 1 and err.startswith("fleet-server: error: unknown event kind 'tokens' (did you mean token?); ")

    rc, out, _ = run_cli(["alerts", "events", "--kind", "alert_opened", "--data", str(data)])
    assert (rc, out) == (0, "no events\n")  # a kind that exists but has no events yet


def test_the_event_kinds_are_every_kind_the_server_records() -> None:
    """EVENT_KINDS is what --kind is checked against: every ``record_event(c, at, KIND, ...)`` in the server and
    the ``device_state`` trigger of the store's schema, and nothing else."""
    from fleet_server.retraining import EVENT_KINDS

    recorded: set[str] = set()
    for path in Path(fleet_server.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                    "record_event":
                kind = node.args[2]
                assert isinstance(kind, ast.Constant) and isinstance(kind.value, str), f"{path}: a computed kind"
                recorded.add(kind.value)
    schema = (Path(fleet_server.__file__).parent / "store.py").read_text()
    assert "'device_state', new.device_id" in schema
    assert set(EVENT_KINDS) == recorded | {"device_state"} and len(EVENT_KINDS) == len(set(EVENT_KINDS))


# ---- tokens ---------------------------------------------------------------------------------------------------
def test_tokens_create_prints_a_revoke_command_that_works_as_printed(built: Any, tmp_path: Path) -> None:
    data = tmp_path / "the server's data"  # a folder name a shell must have quoted
    assert run_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")])[0] == 0
    rc, out, err = run_cli(["tokens", "create", "--data", str(data), "--role", "viewer", "--name", "wall"])
    assert rc == 0 and err.startswith("(a viewer token, id ")
    command = err[err.index("`") + 1:err.rindex("`")]

    argv = shlex.split(command)  # as a shell would split it
    assert argv[:3] == ["fleet-server", "tokens", "revoke"]
    rc, revoked, err = run_cli(argv[1:])

    assert rc == 0, err
    store = Store(data / "fleet.sqlite")
    try:
        assert revoked == f"token {token_id(store, out.strip())} (viewer, wall) is revoked\n"
    finally:
        store.close()
    listed = json.loads(run_cli(["tokens", "list", "--data", str(data), "--json"])[1])
    assert [t["state"] for t in listed] == ["revoked"]
    assert run_cli(["tokens", "create", "--data", str(data), "--role", "operator"])[2].startswith("(an operator token")
