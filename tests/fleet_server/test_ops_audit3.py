"""What the third operator audit of the fleet server found, as specifications: a backup never deletes the folder it
backs up (nor any `.partial` it did not make), and copies a damaged or read-only data folder as well as it can;
`init` is all or nothing (the pinned root key is never overwritten, a full disk leaves nothing behind); a failed
COMMIT's real error is kept; a long summary prune does not stop the quarantine cap checks; out-of-range settings,
a forged token name and a damaged database are one line naming what to fix."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet_contracts.signing import generate_key, save_public_key
from fleet_server.housekeeping import HousekeepingService
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.fleet_server.conftest import run_cli
from tests.support import fill, small_tmpfs, wait_until

DAY = 86400.0


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (what a destructive command must leave as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- backup ------------------------------------------------------------------------------------------------
def test_backup_into_the_partial_name_of_the_data_folder_refuses_and_deletes_nothing(cli_data: Path) -> None:
    """The audit's case: `cp -a srv site.partial; fleet-server backup --data site.partial --to site` removed
    site.partial, the very folder being backed up, as if a backup had left it."""
    data = cli_data.with_name("site.partial")
    shutil.copytree(cli_data, data, symlinks=True)
    before = _listing(data)

    rc, _, err = run_cli(["backup", "--data", str(data), "--to", str(cli_data.with_name("site"))])

    assert rc == 1
    assert str(data) in err and "data folder" in err and "Traceback" not in err
    assert _listing(data) == before
    assert not cli_data.with_name("site").exists()


def test_backup_refuses_a_partial_folder_it_did_not_make_and_replaces_one_it_left(cli_data: Path) -> None:
    to = cli_data.with_name("site")
    partial = cli_data.with_name("site.partial")
    partial.mkdir()
    (partial / "notes.txt").write_text("someone's work\n")

    rc, _, err = run_cli(["backup", "--data", str(cli_data), "--to", str(to)])
    assert rc == 1 and str(partial) in err and "not left by a backup" in err
    assert (partial / "notes.txt").read_text() == "someone's work\n"

    shutil.rmtree(partial)
    # An interrupted backup leaves its marker first, so the next backup may clear the folder it left.
    from fleet_server.backup import PARTIAL_MARKER

    partial.mkdir()
    (partial / PARTIAL_MARKER).touch()
    (partial / "fleet.sqlite").write_bytes(b"half")
    rc, out, err = run_cli(["backup", "--data", str(cli_data), "--to", str(to)])
    assert rc == 0, err
    assert not partial.exists() and (to / "fleet.sqlite").is_file() and not (to / PARTIAL_MARKER).exists()


def _corrupt(db: Path) -> None:
    """Overwrite the database's pages after the first (the schema stays readable, the b-trees do not)."""
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xa5" * (size - 4096 * 2))


def test_a_damaged_database_is_one_line_naming_it_for_commands_and_backup(cli_data: Path) -> None:
    db = cli_data / "fleet.sqlite"
    _corrupt(db)

    for argv in (["tokens", "list"], ["devices", "list"]):
        rc, _, err = run_cli([*argv, "--data", str(cli_data)])
        assert rc == 1, argv
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert str(db) in err and "damaged" in err and "backup" in err, err

    rc, _, err = run_cli(["backup", "--data", str(cli_data), "--to", str(cli_data.with_name("site"))])
    assert rc == 1 and err.count("\n") == 1, err
    assert "damaged" in err and str(db) in err
    assert not cli_data.with_name("site").exists() and not cli_data.with_name("site.partial").exists()


def test_a_truncated_database_is_one_line_too(cli_data: Path) -> None:
    db = cli_data / "fleet.sqlite"
    with db.open("r+b") as f:
        f.truncate(100)
    rc, _, err = run_cli(["tokens", "list", "--data", str(cli_data)])
    assert rc == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert str(db) in err and "damaged" in err


def test_backup_copies_a_data_folder_on_a_read_only_file_system(cli_data: Path, tmp_path: Path) -> None:
    """A snapshot mounted read-only: SQLite cannot make the -shm file a reader needs there (mode=ro failed)."""
    assert run_cli(["tokens", "create", "--data", str(cli_data), "--role", "viewer", "--name", "wall"])[0] == 0
    assert not cli_data.with_name("fleet.sqlite-wal").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(cli_data), str(ro)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        rc, out, err = run_cli(["backup", "--data", str(ro), "--to", str(tmp_path / "site")])
    finally:
        subprocess.run(["umount", str(ro)], check=True, capture_output=True)
    assert rc == 0, err
    con = sqlite3.connect(tmp_path / "site" / "fleet.sqlite")
    try:
        assert con.execute("SELECT name FROM tokens").fetchall() == [("wall",)]
        assert con.execute("SELECT COUNT(*) FROM model_versions").fetchone() == (1,)
    finally:
        con.close()


# ---- init --------------------------------------------------------------------------------------------------
def test_a_refused_init_leaves_the_pinned_root_key_as_it_was(built: Any, cli_data: Path, tmp_path: Path) -> None:
    """The audit's case: a folder that lost its server.toml still holds keys/; init with another root key
    overwrote keys/root.pub before it found keys/fleet.key there and stopped."""
    pinned = (cli_data / "keys" / "root.pub").read_bytes()
    (cli_data / "server.toml").unlink()
    before = _listing(cli_data / "keys")
    other = tmp_path / "other.pub"
    save_public_key(generate_key().public_key(), other)

    rc, _, err = run_cli(["init", "--data", str(cli_data), "--root-key", str(other)])

    assert rc == 1 and "keys/root.pub" in err and "Traceback" not in err
    assert (cli_data / "keys" / "root.pub").read_bytes() == pinned
    assert _listing(cli_data / "keys") == before and not (cli_data / "server.toml").exists()


def test_init_on_a_full_disk_fails_in_one_line_and_leaves_nothing(built: Any, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        filler = fill(mnt)
        filler_size = filler.stat().st_size
        # Room for the keys, not for the database's first pages.
        with filler.open("r+b") as f:
            f.truncate(filler_size - 3 * 4096)
        data = mnt / "srv"

        rc, _, err = run_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")])

        assert rc == 1
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert "full" in err and "cannot rollback" not in err, err
        assert not data.exists()
        filler.unlink()  # room again: the same init now succeeds
        rc, _, err = run_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")])
        assert rc == 0, err
        assert run_cli(["tokens", "list", "--data", str(data)])[0] == 0


# ---- store -------------------------------------------------------------------------------------------------
def test_a_commit_that_fails_on_a_full_disk_raises_disk_full_not_the_rollback(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "2m") as mnt:
        store = Store(mnt / "fleet.sqlite")
        try:
            fill(mnt)
            with pytest.raises(sqlite3.OperationalError, match="database or disk is full"), store.write() as c:
                c.execute("INSERT INTO events (at, kind, subject, detail) VALUES (1, 'k', 's', ?)", ("x" * 3000,))
            assert not store.conn().in_transaction
            (mnt / "filler").unlink()
            with store.write() as c:  # the connection is usable again
                c.execute("INSERT INTO events (at, kind, subject, detail) VALUES (1, 'k', 's', '{}')")
        finally:
            store.close()


# ---- housekeeping ------------------------------------------------------------------------------------------
def test_the_quarantine_cap_holds_while_a_long_summary_prune_runs(cli_data: Path) -> None:
    """The audit's case: 1.5M old summaries took a pass ~30 s to prune, while the same thread's once-a-second
    quarantine check waited and a flood grew the quarantine to 9x its cap. Here a prune of many chunks runs and
    the quarantine is flooded meanwhile: it is back under its cap long before the prune ends."""
    settings = ServerSettings(data_dir=cli_data, quarantine_max_rows=10, housekeeping_chunk_rows=10,
                              housekeeping_interval_seconds=3600)
    store = Store(settings.db_path)
    now = time.time()
    with store.write() as c:
        c.executemany("INSERT INTO summaries VALUES ('dev-1', ?, 'clinical', '1.0.0', '', '', 1, '{}', ?)",
                      [(seq, now - 500 * DAY) for seq in range(1, 3001)])  # 300 chunks, >= 6 s at 20 ms apart
    svc = HousekeepingService(settings, store, pause_seconds=0.02, check_seconds=0.1)

    def count(sql: str) -> int:
        return int(store.one(sql)[0])

    try:
        svc.start()
        assert wait_until(lambda: count("SELECT COUNT(*) FROM summaries") < 2950, 5)  # the prune is under way
        with store.write() as c:
            c.executemany("INSERT INTO quarantine (received, source, reason, detail, payload) VALUES (?, 'http', "
                          "'shape', '', x'00')", [(now,)] * 100)
        assert wait_until(lambda: count("SELECT row_count FROM quarantine_usage") <= 10, 2), "quarantine unchecked"
        assert count("SELECT COUNT(*) FROM summaries") > 0, "the prune ended first: the test proves nothing"
    finally:
        svc.stop()
        store.close()


# ---- settings and names ------------------------------------------------------------------------------------
def _add_storage(data: Path, table: str) -> None:
    conf = data / "server.toml"
    conf.write_text(conf.read_text() + "\n[storage]\n" + table)


def test_a_retention_beyond_a_century_is_refused_naming_the_key_and_the_flag(cli_data: Path) -> None:
    _add_storage(cli_data, "summary_retention_days = 1e7\n")
    rc, _, err = run_cli(["housekeeping", "--data", str(cli_data)])
    assert rc == 1 and "Traceback" not in err
    assert "summary_retention_days" in err and "server.toml" in err and "36,600" in err

    conf = cli_data / "server.toml"
    conf.write_text(conf.read_text().replace("summary_retention_days = 1e7", "summary_retention_days = 36600"))
    rc, _, err = run_cli(["housekeeping", "--data", str(cli_data), "--summary-retention-days", "1e6"])
    assert rc == 1 and "Traceback" not in err
    assert "--summary-retention-days" in err and "36,600" in err
    assert run_cli(["housekeeping", "--data", str(cli_data)])[0] == 0  # 36,600 days itself is accepted


@pytest.mark.parametrize("http", ["localhost:80:80", "::1:8480"])
def test_an_unbracketed_host_holding_a_colon_is_refused_naming_server_toml(cli_data: Path, http: str) -> None:
    conf = cli_data / "server.toml"
    conf.write_text(conf.read_text().replace('http = "127.0.0.1:8480"', f'http = "{http}"'))
    rc, _, err = run_cli(["tokens", "list", "--data", str(cli_data)])
    assert rc == 1 and str(conf) in err and "http" in err and "[::1]:8480" in err, err


def test_a_bracketed_ipv6_host_is_still_accepted(cli_data: Path) -> None:
    conf = cli_data / "server.toml"
    conf.write_text(conf.read_text().replace('http = "127.0.0.1:8480"', 'http = "[::1]:8480"'))
    assert run_cli(["tokens", "list", "--data", str(cli_data)])[0] == 0


@pytest.mark.parametrize("name", ["laptop\nabc123  admin    active   forged", "a\x1b[2Jb", "rtl\u202etxt", "x" * 65])
def test_a_token_name_with_control_characters_or_too_long_is_refused_naming_the_flag(cli_data: Path,
                                                                                    name: str) -> None:
    rc, out, err = run_cli(["tokens", "create", "--data", str(cli_data), "--role", "admin", "--name", name])
    assert rc == 1 and "--name" in err and out == ""
    assert run_cli(["tokens", "list", "--data", str(cli_data)])[1] == "no tokens\n"  # nothing was created


def test_a_plain_token_name_of_64_characters_is_accepted(cli_data: Path) -> None:
    name = "wall screen, ward 3 — Zoë" + "x" * (64 - 25)
    assert run_cli(["tokens", "create", "--data", str(cli_data), "--role", "viewer", "--name", name])[0] == 0
    assert name in run_cli(["tokens", "list", "--data", str(cli_data)])[1]
