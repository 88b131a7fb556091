"""Backing up a fleet server's data folder while it runs: ``fleet-server backup --data DIR --to NEW_DIR``.

What a restore needs is the whole folder, not only the database: ``server.toml`` (the fleet's name), ``keys/``
(the pinned root key and the fleet's signing key: without it, desired states already on devices can no longer
be followed by new ones) and ``packages/`` (what devices download). The database is copied with SQLite's
online backup API, which reads one consistent snapshot while ingest keeps committing (in WAL mode a reader does
not block the writer), so no summary is half in the copy. Package files never change once published (a new
version is a new file), so they are copied as they are and checked against the lengths and hashes the copied
database records.

The copy is made in ``NEW_DIR.partial`` and renamed to ``NEW_DIR`` only once it is complete and checked
(``PRAGMA integrity_check``), so a folder named ``NEW_DIR`` is always a whole backup. It is owner-only: it holds
the fleet's private key. ``backup.json`` in it records what was copied. Restoring is pointing ``--data`` at it.
The first thing written into ``NEW_DIR.partial`` is a marker file (``PARTIAL_MARKER``); a ``.partial`` folder
left by a backup that did not finish is removed only when it holds that marker, so a folder of that name that
is anything else (the data folder itself, a copy of it) is never deleted: the backup refuses, naming it.

A data folder on a read-only file system (a mounted snapshot, a disk taken from a dead server) is copied too:
SQLite cannot make the ``-shm`` file its readers need there, so the database is opened as immutable, which is
exact because nothing can be writing to it. A ``-wal`` file holding commits not yet in the database would be
ignored that way, so the backup refuses then. A damaged database (``PRAGMA integrity_check`` fails, or SQLite
reports it malformed) stops the backup with one line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from edgefleet_contracts.digest import sha256_file

from .errors import ConfigError
from .settings import ServerSettings

__all__ = ["backup"]


PARTIAL_MARKER = ".edgefleet-backup-partial"  # written first into NEW_DIR.partial: only such a folder is removed


def _source_uri(src: Path) -> str:
    """The URI the database is read through: read-only; immutable when its folder cannot be written (SQLite
    cannot make the ``-shm`` file a WAL reader needs there, and nothing can be writing). ConfigError when a
    ``-wal`` file there holds commits an immutable reader would not see."""
    uri = src.resolve().as_uri()  # any folder name
    if os.access(src.parent, os.W_OK):
        return uri + "?mode=ro"
    wal = src.with_name(src.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise ConfigError(f"{src.parent} is read-only and {wal} holds commits not yet in {src.name}: a copy would "
                          "miss them; back up from a writable copy of the folder (cp -a), where they are read")
    return uri + "?mode=ro&immutable=1"


def _copy_db(src: Path, dst: Path) -> dict[str, int]:
    os.close(os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    source = sqlite3.connect(_source_uri(src), uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)  # one consistent snapshot, whatever the server commits meanwhile
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        problems = [r[0] for r in target.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise ConfigError(f"the database {src} is damaged (its copy fails the integrity check: "
                              f"{'; '.join(problems[:3])}); restore the data folder from an earlier backup")
        tables = [r[0] for r in target.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        # table names from the database's own schema, quoted
        return {t: int(target.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]) for t in tables}
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed", "file is not a database"
        if isinstance(exc, sqlite3.OperationalError) and "malformed" not in str(exc):
            raise  # locked, disk full, cannot open: not damage
        raise ConfigError(f"the database {src} is damaged ({exc}); restore the data folder from an earlier "
                          "backup") from None
    finally:
        target.close()
        source.close()


def _clear_partial(partial: Path, data: Path) -> None:
    """Remove ``partial`` when a backup that did not finish left it (it holds PARTIAL_MARKER); ConfigError when it
    is anything else (the data folder itself, a folder holding it, a copy of it): it is never deleted."""
    if not partial.exists() and not partial.is_symlink():
        return
    if data.resolve().is_relative_to(partial.resolve()):
        raise ConfigError(f"{partial} is where this backup is made, but it is (or holds) the data folder {data} "
                          "being backed up; back up to another folder name")
    if partial.is_symlink() or not partial.is_dir() or not (partial / PARTIAL_MARKER).is_file():
        raise ConfigError(f"{partial} exists and was not left by a backup (no {PARTIAL_MARKER} in it); it is where "
                          "this backup is made: move it away or back up to another folder name")
    shutil.rmtree(partial)  # left by a backup that did not finish


def backup(settings: ServerSettings, to: Path) -> dict[str, Any]:
    """Copy the data folder of ``settings`` to ``to`` (which must not exist); returns what ``backup.json`` says.

    Raises ConfigError when the source is not a data folder, ``to`` is inside it (checked on the resolved paths,
    so through symlinks and ``..`` too: the copy would land in the folder being copied, and every later backup
    would copy the earlier ones again), ``to`` exists, ``to.partial`` exists and is not a backup's unfinished
    folder (it is then left as it is), the database is damaged, or the copy does not check out.
    """
    data, to = settings.data_dir, Path(to)
    if not (data / "server.toml").is_file() or not settings.db_path.is_file():
        raise ConfigError(f"{data} is not a fleet-server data folder (no server.toml or database)")
    if to.resolve().is_relative_to(data.resolve()):
        raise ConfigError(f"{to} is inside the data folder {data} it would copy; back up to a folder outside it "
                          f"(e.g. {data.resolve().parent / (data.resolve().name + '-backup')})")
    if to.exists():
        raise ConfigError(f"{to} exists; back up into a new folder (a backup never overwrites one)")
    partial = to.with_name(to.name + ".partial")
    _clear_partial(partial, data)
    started = time.time()
    partial.mkdir(mode=0o700, parents=True)
    try:
        (partial / PARTIAL_MARKER).touch(mode=0o600)  # first: only a folder holding it is ever removed
        shutil.copy2(data / "server.toml", partial / "server.toml")
        rows = _copy_db(settings.db_path, partial / "fleet.sqlite")
        # The keys after the database: a publish racing the backup can then only leave the copy's keys/keyset.json
        # newer than the copied database's packages (harmless: keysets move forward), never older.
        shutil.copytree(data / "keys", partial / "keys")  # copy2 keeps each key file's mode (0600)
        (partial / "keys").chmod(0o700)
        packages = _copy_packages(settings.packages_dir, partial)
        doc = {"source": str(data.resolve()), "started": started, "finished": time.time(), "rows": rows,
               "packages": packages}
        (partial / "backup.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        for f in (partial / "server.toml", partial / "backup.json"):
            f.chmod(0o600)
        (partial / PARTIAL_MARKER).unlink()
        partial.rename(to)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return doc


def _copy_packages(packages_dir: Path, partial: Path) -> list[dict[str, Any]]:
    """Copy every package the copied database lists and check its length and hash against it."""
    out: list[dict[str, Any]] = []
    (partial / "packages").mkdir(mode=0o700)
    con = sqlite3.connect(partial / "fleet.sqlite")
    try:
        rows = con.execute("SELECT name, version, sha256, length, path FROM model_versions ORDER BY name, version")
        listed = list(rows)
    finally:
        con.close()
    for name, version, sha, length, path in listed:
        src = packages_dir / Path(path).name  # the folder may have moved since publishing: look in this one
        dst = partial / "packages" / src.name
        if not src.is_file():
            raise ConfigError(f"package {name} {version} ({src}) is missing from the data folder")
        shutil.copy2(src, dst)
        if dst.stat().st_size != length or sha256_file(dst) != sha:
            raise ConfigError(f"package {name} {version} ({src}) does not match its published length and sha256")
        out.append({"name": name, "version": version, "file": dst.name, "length": length, "sha256": sha})
    return out
