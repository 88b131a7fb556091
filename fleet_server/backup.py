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


def _copy_db(src: Path, dst: Path) -> dict[str, int]:
    os.close(os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    source = sqlite3.connect(src.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)  # any folder name
    target = sqlite3.connect(dst)
    try:
        source.backup(target)  # one consistent snapshot, whatever the server commits meanwhile
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        problems = [r[0] for r in target.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise ConfigError(f"the copied database fails its integrity check: {problems[:5]}")
        tables = [r[0] for r in target.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        # table names from the database's own schema, quoted
        return {t: int(target.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]) for t in tables}
    finally:
        target.close()
        source.close()


def backup(settings: ServerSettings, to: Path) -> dict[str, Any]:
    """Copy the data folder of ``settings`` to ``to`` (which must not exist); returns what ``backup.json`` says.

    Raises ConfigError when the source is not a data folder, ``to`` is inside it (checked on the resolved paths,
    so through symlinks and ``..`` too: the copy would land in the folder being copied, and every later backup
    would copy the earlier ones again), ``to`` exists, or the copy does not check out.
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
    if partial.exists():
        shutil.rmtree(partial)  # left by a backup that did not finish
    started = time.time()
    partial.mkdir(mode=0o700, parents=True)
    try:
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
