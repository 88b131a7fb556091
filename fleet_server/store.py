"""The server store: one SQLite file (WAL) behind one module, so a PostgreSQL backend can follow.

Writes use ``BEGIN IMMEDIATE`` with a busy timeout and retry (a deferred BEGIN fails at once with two writers:
see FIELD-NOTES). The schema is versioned by an ordered list of migrations applied once each.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

MIGRATIONS: list[str] = [
    # 1: the base schema
    """
    CREATE TABLE tokens (id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT UNIQUE NOT NULL,
        created REAL NOT NULL, expires REAL, revoked INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE devices (device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, fleet TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '{}', enrolled REAL NOT NULL, last_seen REAL, reported TEXT);
    CREATE TABLE enrollment_tokens (hash TEXT PRIMARY KEY, tags TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL,
        expires REAL NOT NULL, used_by TEXT);
    CREATE TABLE models (name TEXT PRIMARY KEY, owner TEXT NOT NULL, oncall TEXT NOT NULL,
        retrain_every_s REAL, last_retrained REAL, retrain_hook TEXT, retrain_on_drift INTEGER NOT NULL DEFAULT 0,
        alert_rules TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
    CREATE TABLE model_versions (name TEXT NOT NULL, version TEXT NOT NULL, target TEXT NOT NULL,
        sha256 TEXT NOT NULL, length INTEGER NOT NULL, path TEXT NOT NULL, manifest TEXT NOT NULL,
        profile TEXT NOT NULL, calibration TEXT NOT NULL, published REAL NOT NULL, PRIMARY KEY (name, version));
    CREATE TABLE summaries (device_id TEXT NOT NULL, seq INTEGER NOT NULL, model TEXT NOT NULL,
        version TEXT NOT NULL, window_start TEXT NOT NULL, window_end TEXT NOT NULL, count INTEGER NOT NULL,
        body TEXT NOT NULL, received REAL NOT NULL, PRIMARY KEY (device_id, seq));
    CREATE INDEX summaries_model ON summaries (model, version, received);
    CREATE TABLE quarantine (id INTEGER PRIMARY KEY AUTOINCREMENT, received REAL NOT NULL, source TEXT NOT NULL,
        device_id TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB);
    CREATE INDEX quarantine_reason ON quarantine (reason);
    CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT, kind TEXT NOT NULL,
        dedup_key TEXT NOT NULL, state TEXT NOT NULL, severity TEXT NOT NULL, summary TEXT NOT NULL,
        evidence TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, acknowledged_by TEXT,
        delivery_state TEXT NOT NULL DEFAULT 'pending', delivery_attempts INTEGER NOT NULL DEFAULT 0,
        delivery_error TEXT, next_attempt REAL);
    CREATE INDEX alerts_open ON alerts (dedup_key, state);
    CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL,
        subject TEXT NOT NULL, detail TEXT NOT NULL);
    """,
    # 2: rollouts and desired state
    """
    CREATE TABLE rollouts (id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        previous TEXT, cohort TEXT NOT NULL, stages TEXT NOT NULL, bake_seconds REAL NOT NULL,
        max_per_minute INTEGER NOT NULL, maint_window TEXT NOT NULL, thresholds TEXT NOT NULL,
        approve_stages TEXT NOT NULL,
        state TEXT NOT NULL, stage INTEGER NOT NULL, stage_started REAL NOT NULL, approved TEXT NOT NULL,
        targeted TEXT NOT NULL, created REAL NOT NULL, created_by TEXT NOT NULL, updated REAL NOT NULL);
    CREATE TABLE rollout_decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL, at REAL NOT NULL,
        actor TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL, evidence TEXT NOT NULL);
    CREATE INDEX rollout_decisions_rollout ON rollout_decisions (rollout, id);
    CREATE TABLE desired (device_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, model TEXT NOT NULL,
        version TEXT NOT NULL, rollout TEXT NOT NULL, envelope TEXT NOT NULL, updated REAL NOT NULL,
        published INTEGER NOT NULL DEFAULT 0);
    """,
    # 3: device history for the dashboard — every change of a device's reported install result or active
    # version becomes an ``events`` row (kind ``device_state``), written by the same transaction as the report.
    """
    CREATE INDEX events_subject ON events (subject, id);
    CREATE TRIGGER device_state_history AFTER UPDATE OF reported ON devices
    WHEN new.reported IS NOT NULL AND (old.reported IS NULL
        OR json_extract(old.reported, '$.last_result') IS NOT json_extract(new.reported, '$.last_result')
        OR json_extract(old.reported, '$.active') IS NOT json_extract(new.reported, '$.active'))
    BEGIN
        INSERT INTO events (at, kind, subject, detail) VALUES (
            (julianday('now') - 2440587.5) * 86400.0, 'device_state', new.device_id,
            json_object('at', json_extract(new.reported, '$.at'),
                        'active', json(COALESCE(json_extract(new.reported, '$.active'), 'null')),
                        'standby', json(COALESCE(json_extract(new.reported, '$.standby'), 'null')),
                        'update_state', json_extract(new.reported, '$.update_state'),
                        'last_result', json(COALESCE(json_extract(new.reported, '$.last_result'), 'null'))));
    END;
    """,
    # 4: bounded quarantine (fleet_server/housekeeping.py). ``quarantine_usage`` holds the quarantine's row count
    # and payload bytes, kept by triggers in the transaction that changes the table, so the housekeeping pass
    # reads them in O(1) instead of scanning; every row whose id is below ``payload_floor`` has lost its payload.
    """
    CREATE TABLE quarantine_usage (id INTEGER PRIMARY KEY CHECK (id = 0), row_count INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL, payload_floor INTEGER NOT NULL);
    INSERT INTO quarantine_usage SELECT 0, COUNT(*), COALESCE(SUM(length(payload)), 0), 0 FROM quarantine;
    CREATE TRIGGER quarantine_usage_insert AFTER INSERT ON quarantine BEGIN
        UPDATE quarantine_usage SET row_count = row_count + 1,
            payload_bytes = payload_bytes + COALESCE(length(new.payload), 0) WHERE id = 0;
    END;
    CREATE TRIGGER quarantine_usage_delete AFTER DELETE ON quarantine BEGIN
        UPDATE quarantine_usage SET row_count = row_count - 1,
            payload_bytes = payload_bytes - COALESCE(length(old.payload), 0) WHERE id = 0;
    END;
    CREATE TRIGGER quarantine_usage_payload AFTER UPDATE OF payload ON quarantine BEGIN
        UPDATE quarantine_usage SET payload_bytes = payload_bytes + COALESCE(length(new.payload), 0)
            - COALESCE(length(old.payload), 0) WHERE id = 0;
    END;
    """,
    # 5: revoked devices (a lost or stolen device): kept for the record, refused by ingest, never targeted again
    """
    ALTER TABLE devices ADD COLUMN revoked REAL;
    ALTER TABLE devices ADD COLUMN revoked_reason TEXT;
    """,
    # 6: a device enrolled again with a new key is a new generation (re-provisioned: its sequence restarts at 1);
    # its summaries are stored at seq + seq_base, the highest seq stored before, so they never collide with the
    # previous generation's (which would have made them "duplicates", acknowledged and dropped)
    """
    ALTER TABLE devices ADD COLUMN seq_base INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: rollouts listed newest first a page at a time (GET /api/v1/rollouts?before=): a range read, not a sort
    "CREATE INDEX rollouts_created ON rollouts (created, id);",
]


def statements(script: str) -> list[str]:
    """Split a migration into complete SQL statements (a trigger body's inner ``;`` does not end it)."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n;"):
                out.append(buf.strip())
            buf = ""
    if buf.strip(" \n;"):
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]}")
    return out


def record_event(c: sqlite3.Connection, at: float, kind: str, subject: str, detail: dict[str, Any]) -> None:
    """One row of the ``events`` table (the audit trail: alerts, retraining, tokens, devices), inside the caller's
    write transaction."""
    c.execute("INSERT INTO events (at, kind, subject, detail) VALUES (?, ?, ?, ?)",
              (at, kind, subject, json.dumps(detail, sort_keys=True, default=str)))


class _Connection(sqlite3.Connection):
    """A connection the store can hold weakly (``sqlite3.Connection`` itself takes no weak references)."""


class Store:
    """The server's SQLite file. One connection per thread; ``close`` closes every thread's connection."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only: it holds token hashes, enrollment tokens and device keys. SQLite gives the -wal and -shm
        # files the database file's mode; a database made before this is tightened here.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        if self.path.stat().st_mode & 0o077:
            self.path.chmod(0o600)
        for extra in (self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")):
            if extra.exists() and extra.stat().st_mode & 0o077:
                extra.chmod(0o600)
        self._local = threading.local()
        # Every thread's connection, held weakly (a finished thread's connection goes with it), so ``close`` can
        # close them all: the last one to close checkpoints the WAL into the database file and removes the
        # ``-wal``/``-shm`` files, leaving one self-contained file after a clean stop.
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._open_lock = threading.Lock()
        self._generation = 0
        self.migrate()

    def conn(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads here)."""
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "generation", -1) != self._generation:
            c = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False,
                                factory=_Connection)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
            c.execute("PRAGMA foreign_keys=ON")
            self._local.conn, self._local.generation = c, self._generation
            with self._open_lock:
                self._open.add(c)
        return c

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE, retried while another writer holds the lock). What the block or
        the COMMIT raises is raised as it is (a failed COMMIT's "database or disk is full", not the rollback's)."""
        c = self.conn()
        for attempt in range(100):
            try:
                c.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(min(0.5, 0.01 * (attempt + 1)))
        else:
            raise sqlite3.OperationalError(f"{self.path} stayed locked")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed (SQLITE_FULL, an I/O error) may have rolled back already: a ROLLBACK then
            # raises "cannot rollback - no transaction is active", hiding the error that matters. Roll back only
            # a transaction still open, and never let the rollback's own failure replace the original error.
            if c.in_transaction:
                with suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
            raise

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self.conn().execute(sql, args))

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = self.conn().execute(sql, args).fetchone()
        return rows

    def migrate(self) -> int:
        c = self.conn()
        c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = c.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for i, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            with self.write() as w:
                for stmt in statements(sql):
                    w.execute(stmt)
                w.execute("INSERT INTO schema_version VALUES (?)", (i,))
        return len(MIGRATIONS)

    def close(self, *, checkpoint: bool = False) -> None:
        """Close every thread's connection (call once the threads using the store have stopped; one that uses
        it later gets a new connection). The last to close checkpoints the WAL into the database file.

        ``checkpoint``: first fold the WAL into the database file and empty it, even if some other process's
        connection keeps the -wal file from being removed (the server's own stop does this). Only for the last
        user of the database: a TRUNCATE checkpoint holds the write lock while it waits for readers, so a CLI
        command or a validator process closing this way would stall a running server's ingest writer."""
        with self._open_lock:
            conns = list(self._open)
            self._open = weakref.WeakSet()
            self._generation += 1
        self._local.conn = None
        if conns and checkpoint:
            with suppress(sqlite3.Error):
                conns[0].execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:  # e.g. in use by a thread that did not stop: it closes when that thread ends
                continue
