"""``fleet-server backup``: a consistent, checked, owner-only copy of the whole data folder, made while the
server writes, that a server can run from."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from fleet_server.backup import backup
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ConfigError
from fleet_server.settings import ServerSettings
from fleet_server.store import Store


@pytest.fixture()
def data(cli_data: Path) -> Path:
    return cli_data


def test_a_backup_taken_while_the_server_writes_is_one_consistent_snapshot(data: Path, tmp_path: Path) -> None:
    store = Store(data / "fleet.sqlite")
    stop = threading.Event()
    written = [0]

    def writer() -> None:  # transactions of two rows each, as ingest commits batches, until told to stop
        while not stop.is_set() and written[0] < 200_000:
            with store.write() as c:
                c.executemany("INSERT INTO events (at, kind, subject, detail) VALUES (0, 'pair', ?, '')",
                              [(str(written[0]),), (str(written[0]),)])
            written[0] += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        while written[0] < 50:
            stop.wait(0.01)
        doc = backup(ServerSettings(data_dir=data), tmp_path / "b1")
        copied_while = written[0]
    finally:
        stop.set()
        t.join(30)
        store.close()
    con = sqlite3.connect(tmp_path / "b1" / "fleet.sqlite")
    pairs = con.execute("SELECT COUNT(*) FROM events WHERE kind = 'pair'").fetchone()[0]
    unmatched = con.execute("SELECT COUNT(*) FROM (SELECT subject FROM events WHERE kind = 'pair' GROUP BY subject"
                            " HAVING COUNT(*) != 2)").fetchone()[0]
    con.close()
    assert pairs % 2 == 0 and unmatched == 0  # no transaction is half in the copy
    assert 100 <= pairs <= 2 * copied_while + 2
    assert doc["rows"]["devices"] == 1 and doc["rows"]["model_versions"] == 1
    assert not (tmp_path / "b1" / "fleet.sqlite-wal").exists()  # one self-contained file


def test_the_backup_is_whole_checked_and_owner_only_and_a_server_runs_from_it(
        data: Path, tmp_path: Path, built: Any, capsys: pytest.CaptureFixture[str]) -> None:
    to = tmp_path / "b2"
    assert fleet_cli(["backup", "--data", str(data), "--to", str(to)]) == 0
    assert f"backed up {data} to {to}: 1 devices" in capsys.readouterr().out
    assert (to.stat().st_mode & 0o777) == 0o700 and (to / "keys").stat().st_mode & 0o777 == 0o700
    assert (to / "keys" / "fleet.key").stat().st_mode & 0o777 == 0o600
    assert (to / "keys" / "fleet.key").read_bytes() == (data / "keys" / "fleet.key").read_bytes()
    doc = json.loads((to / "backup.json").read_text())
    pkg = to / "packages" / doc["packages"][0]["file"]
    assert hashlib.sha256(pkg.read_bytes()).hexdigest() == hashlib.sha256(built.package.read_bytes()).hexdigest()
    assert not (tmp_path / "b2.partial").exists()
    # Restoring is pointing --data at it
    assert fleet_cli(["devices", "list", "--data", str(to)]) == 0
    assert "dev-1" in capsys.readouterr().out
    assert fleet_cli(["models", "show", "clinical", "--data", str(to)]) == 0


def test_a_backup_never_overwrites_and_leaves_nothing_half_made(data: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="exists; back up into a new folder"):
        backup(ServerSettings(data_dir=data), tmp_path / "taken")
    with pytest.raises(ConfigError, match="not a fleet-server data folder"):
        backup(ServerSettings(data_dir=tmp_path / "nowhere"), tmp_path / "b3")
    for p in (data / "packages").iterdir():  # a package lost from the data folder: refused, nothing left
        p.unlink()
    with pytest.raises(ConfigError, match="is missing from the data folder"):
        backup(ServerSettings(data_dir=data), tmp_path / "b4")
    assert not (tmp_path / "b4").exists() and not (tmp_path / "b4.partial").exists()


def test_a_server_restored_from_a_backup_serves_the_packages_after_the_original_folder_is_gone(
        data: Path, tmp_path: Path, built: Any) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from fleet_server.app import create_app

    backup(ServerSettings(data_dir=data), tmp_path / "restored")
    shutil.rmtree(data)  # the old machine is gone
    settings = ServerSettings(data_dir=tmp_path / "restored")
    store = Store(settings.db_path)
    try:
        with TestClient(create_app(settings, store)) as client:
            r = client.get("/packages/clinical/1.0.0")
            assert r.status_code == 200 and r.content == built.package.read_bytes()
            r = client.get("/packages/clinical/1.0.0", headers={"Range": "bytes=10-19"})
            assert r.status_code == 206 and r.content == built.package.read_bytes()[10:20]
    finally:
        store.close()


def test_a_package_file_lost_from_the_data_folder_is_a_clear_503_not_a_broken_download(data: Path) -> None:
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app

    settings = ServerSettings(data_dir=data)
    for p in settings.packages_dir.iterdir():
        p.unlink()
    store = Store(settings.db_path)
    try:
        with TestClient(create_app(settings, store)) as client:
            r = client.get("/packages/clinical/1.0.0")
            assert r.status_code == 503 and r.json()["error"] == "package_unavailable", r.text
            assert "publish it again" in r.json()["detail"] and r.headers["Retry-After"] == "300"
    finally:
        store.close()


def test_a_backup_into_the_data_folder_it_copies_is_refused_and_writes_nothing(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The copy would land in the folder being copied (and every later backup would copy the earlier ones), so a
    destination inside it is refused, however it is spelled: a subfolder, the folder itself, through ``..`` or a
    symlink."""
    (tmp_path / "link").symlink_to(data)

    def listing() -> list[Path]:  # SQLite's -wal and -shm come and go as the fixture's connections close
        return sorted(p.relative_to(data) for p in data.rglob("*") if not p.name.endswith(("-wal", "-shm")))

    before = listing()
    expected = f"(e.g. {data.resolve().parent / (data.name + '-backup')})"

    for to in (data / "inside", data / "keys" / "b", data, data / ".." / data.name / "x", tmp_path / "link" / "b"):
        assert fleet_cli(["backup", "--data", str(data), "--to", str(to)]) == 1, to
        out, err = capsys.readouterr()
        assert out == "" and err == (f"fleet-server: error: {to} is inside the data folder {data} it would copy; back "
                                     f"up to a folder outside it {expected}\n")

    assert listing() == before  # nothing written, no .partial left
