"""The durable outbox: summaries and the latest report, queued in SQLite until the broker acknowledges them.

One file (``outbox.sqlite``), WAL, ``synchronous=FULL``. Every write is a ``BEGIN IMMEDIATE`` transaction
(a deferred ``BEGIN`` fails at once with ``database is locked`` when another connection writes; an immediate
one waits for the busy timeout, and we retry a few times on top of that).

Rules:

- **Atomic with the caller's state.** ``with outbox.transaction() as tx:`` puts rows and meta values in one
  transaction, so the agent closes a window, bumps its sequence counter and enqueues the summary together.
- **Bounded by merging, never by dropping.** While there are more than ``max_rows`` summary rows, the two
  oldest never-sent rows of one model version are merged (counts add, ``windows`` add, the later ``seq`` and
  the later row position are kept). Rows that were ever handed to the link (``attempts > 0``) are never
  merged: the server may already hold them, and merging would count them twice. When nothing can be merged,
  the table grows past the bound and ``overflow_unmergeable`` counts it.
- **Only the latest report matters**: putting a report deletes every older queued report.
- Bodies are unsigned JSON; the link signs at send time.
- **A full disk is an error, not a crash.** A write that fails for lack of space raises ``OutboxFullError``
  (the transaction is rolled back; every row already queued stays) and is counted in memory
  (``disk_full``, ``write_errors``; a full disk cannot take a counter); the next write after space frees works.
  SQLite says "database or disk is full" (SQLITE_FULL) when a page cannot be written, but only "disk I/O error"
  when it cannot create or grow the ``-shm`` file beside the database (what opening a WAL file on a full disk
  does): an I/O error while the file system has less than ``LOW_SPACE_BYTES`` free (``os.statvfs``) counts as a
  full disk too.
- **A full disk at start is not fatal either** (``wait_for_space=True``, what the agent uses): the outbox then
  starts unopened, every write raises ``OutboxFullError`` (counted), and the file is opened again at most every
  ``reopen_seconds`` by the next write or read, so the summarizer holds its windows in memory exactly as it does
  when the disk fills under a running agent. ``is_open`` says which; ``counters()`` then holds only the in-memory
  counters and ``open: 0`` (what the file holds is unknown until it opens).
- ``generation`` goes up after every committed transaction of this process, so the link can skip reading the
  queue while nothing changed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.summary import Summary, merge

from .errors import AgentError

__all__ = ["Outbox", "OutboxError", "OutboxFullError", "OutboxRow", "OutboxTransaction", "SUMMARY", "REPORT"]

SUMMARY = "summary"
REPORT = "report"
BUSY_TIMEOUT_MS = 5000
LOCK_RETRIES = 5
COUNTER_KEYS = ("merged_total", "overflow_unmergeable")
LOW_SPACE_BYTES = 1 << 20  # an SQLite I/O error with less free space than this is a full disk (-shm, WAL growth)
REOPEN_SECONDS = 2.0

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        seq INTEGER,
        model TEXT,
        version TEXT,
        body TEXT NOT NULL,
        created REAL NOT NULL,
        windows INTEGER NOT NULL DEFAULT 1,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_kind_model ON outbox (kind, model, version, id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


class OutboxError(AgentError):
    """The outbox file cannot be opened, is from a newer agent, or stayed locked by another writer."""

    reason = "outbox"


class OutboxFullError(OutboxError):
    """The file system holding the outbox is full: nothing was written; what was queued before is kept."""

    reason = "outbox_full"


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged process may still write on the file system holding ``folder`` (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _is_full(exc: BaseException, folder: Path) -> bool:
    """True when ``exc`` comes from a full file system: SQLITE_FULL or ENOSPC, or an SQLite I/O error (what a
    ``-shm`` file that cannot be created gives) while ``folder``'s file system has almost no space left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
        return True
    if (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR) or "disk I/O error" in str(exc):
        free = free_bytes(folder)
        return free is not None and free < LOW_SPACE_BYTES
    return False


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str  # SUMMARY | REPORT
    seq: int | None
    body: str  # unsigned JSON document

    def document(self) -> dict[str, Any]:
        doc = json.loads(self.body)
        if not isinstance(doc, dict):
            raise OutboxError(f"outbox row {self.id} does not hold a JSON object")
        return doc


class OutboxTransaction:
    """Operations inside one ``BEGIN IMMEDIATE`` transaction (see :meth:`Outbox.transaction`)."""

    def __init__(self, conn: sqlite3.Connection, max_rows: int) -> None:
        self._conn = conn
        self._max_rows = max_rows

    def put_summary(self, summary: Summary) -> int:
        """Queue a summary; merge old rows if the bound is passed. Returns the new row id."""
        body = json.dumps(summary.to_dict(), separators=(",", ":"))
        cur = self._conn.execute(
            "INSERT INTO outbox (kind, seq, model, version, body, created, windows) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (SUMMARY, summary.seq, summary.model, summary.version, body, time.time(), summary.windows),
        )
        row_id = int(cur.lastrowid or 0)
        self._enforce_bound()
        return row_id

    def put_report(self, report: dict[str, Any]) -> int:
        """Queue ``report``, replacing any older queued report (only the latest state matters)."""
        body = json.dumps(report, separators=(",", ":"), sort_keys=True)
        seq = report.get("seq")
        self._conn.execute("DELETE FROM outbox WHERE kind = ?", (REPORT,))
        cur = self._conn.execute(
            "INSERT INTO outbox (kind, seq, body, created) VALUES (?, ?, ?, ?)",
            (REPORT, seq if isinstance(seq, int) and not isinstance(seq, bool) else None, body, time.time()),
        )
        return int(cur.lastrowid or 0)

    def set_meta(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"meta value for {key!r} must be a str, got {type(value).__name__}")
        self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _bump(self, key: str, by: int = 1) -> None:
        self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?", (key, str(by), by))

    def _enforce_bound(self) -> None:
        while self._summary_rows() > self._max_rows:
            if not self._merge_oldest_pair():
                self._bump("overflow_unmergeable")
                return

    def _summary_rows(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM outbox WHERE kind = ?", (SUMMARY,)).fetchone()[0])

    def _merge_oldest_pair(self) -> bool:
        """Merge the two oldest never-sent rows of the model version whose oldest such row comes first."""
        groups = self._conn.execute(
            "SELECT model, version FROM outbox WHERE kind = ? AND attempts = 0 GROUP BY model, version "
            "HAVING COUNT(*) >= 2 ORDER BY MIN(id)", (SUMMARY,)).fetchall()
        for model, version in groups:
            rows = self._conn.execute(
                "SELECT id, body FROM outbox WHERE kind = ? AND attempts = 0 AND model = ? AND version = ? "
                "ORDER BY id LIMIT 2", (SUMMARY, model, version)).fetchall()
            (old_id, old_body), (new_id, new_body) = rows
            try:
                merged = merge(Summary.from_dict(json.loads(old_body)), Summary.from_dict(json.loads(new_body)))
            except (SchemaError, ValueError):
                continue  # e.g. other bins under the same version: not mergeable, try the next group
            self._conn.execute("UPDATE outbox SET seq = ?, body = ?, windows = ? WHERE id = ?",
                               (merged.seq, json.dumps(merged.to_dict(), separators=(",", ":")),
                                merged.windows, new_id))
            self._conn.execute("DELETE FROM outbox WHERE id = ?", (old_id,))
            self._bump("merged_total")
            return True
        return False


class Outbox:
    """The device's durable queue. Thread-safe (one connection, one lock); other processes may open the file.

    Raises OutboxError when the file cannot be opened or was written by a newer schema; OutboxFullError when the
    disk is full, unless ``wait_for_space`` (then it starts unopened and opens when space frees: module docstring).
    """

    def __init__(self, path: Path, max_rows: int, *, wait_for_space: bool = False,
                 reopen_seconds: float = REOPEN_SECONDS) -> None:
        if max_rows < 1:
            raise OutboxError(f"outbox max_rows must be at least 1, got {max_rows}")
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.RLock()
        self.generation = 0  # committed transactions of this process (read without the lock: an int)
        self._errors = {"write_errors": 0, "disk_full": 0}
        self.last_error: str | None = None
        self.reopen_seconds = reopen_seconds
        self._next_open = 0.0  # monotonic time of the next attempt to open an outbox a full disk kept closed
        self._conn_or_none: sqlite3.Connection | None = None
        self._closed = False
        self._tried_open = True  # the last access to an unopened outbox tried to open it (and counted the failure)
        try:
            self._open()
        except OutboxFullError as exc:
            if not wait_for_space:
                raise
            self._next_open = time.monotonic() + self.reopen_seconds
            log.warning("%s; the agent starts without it: windows are held in memory and the outbox is opened "
                        "again every %g s", exc, self.reopen_seconds)

    def _open(self) -> None:
        """Connect, switch to WAL, migrate. Raises OutboxFullError (counted) or OutboxError; leaves it unopened."""
        conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._conn_or_none = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                                        timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._retrying(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise OutboxError(f"{self.path}: cannot switch the outbox to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except (sqlite3.Error, OSError, OutboxError) as exc:
            self._conn_or_none = None
            if conn is not None:
                conn.close()
            if isinstance(exc, OutboxError):
                raise
            if isinstance(exc, sqlite3.Error) or _is_full(exc, self.path.parent):
                raise self._failed("open", exc) from exc
            raise

    @property
    def is_open(self) -> bool:
        """False while a full disk keeps the file from being opened (``wait_for_space``)."""
        return self._conn_or_none is not None

    @property
    def _conn(self) -> sqlite3.Connection:
        """The connection; an outbox a full disk kept closed is opened first (at most every ``reopen_seconds``).

        Raises OutboxFullError while it still cannot be opened. Call with ``_lock`` held."""
        conn = self._conn_or_none
        if conn is not None:
            return conn
        if self._closed:
            raise OutboxError(f"the outbox {self.path} is closed")
        self._tried_open = time.monotonic() >= self._next_open
        if not self._tried_open:
            raise OutboxFullError(self.last_error or f"disk full: the outbox {self.path} is not open")
        self._next_open = time.monotonic() + self.reopen_seconds
        self._open()  # OutboxFullError (counted) while the disk is still full
        log.warning("disk space is back: the outbox %s is open", self.path)
        return self._conn_or_none  # type: ignore[return-value]  # _open set it or raised

    # ---- schema ------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        def step(conn: sqlite3.Connection) -> bool:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = int(row[0] or 0)
            if current > len(MIGRATIONS):
                raise OutboxError(f"{self.path} has outbox schema version {current}, newer than this agent "
                                  f"supports ({len(MIGRATIONS)}); upgrade the agent or move the file away")
            if current == len(MIGRATIONS):
                return False
            for statement in MIGRATIONS[current].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (current + 1,))
            return True

        while self._write(step):
            pass

    @property
    def schema_version(self) -> int:
        with self._reading() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)

    # ---- transactions ------------------------------------------------------------------------------
    def _retrying(self, step: Callable[[], T]) -> T:
        """``step()``, retried with backoff while another connection holds the lock. The busy timeout does not
        cover everything: switching a fresh file to WAL while another process opens it fails at once with
        "database is locked" (seen ~1 run in 15 of two writers opening one new file under load)."""
        delay = 0.05
        for attempt in range(LOCK_RETRIES + 1):
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if attempt == LOCK_RETRIES:
                    raise OutboxError(f"{self.path} stayed locked by another writer for "
                                      f"{(LOCK_RETRIES + 1) * BUSY_TIMEOUT_MS / 1000:.0f} s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _begin(self) -> None:
        self._retrying(lambda: self._conn.execute("BEGIN IMMEDIATE"))

    @contextmanager
    def transaction(self) -> Iterator[OutboxTransaction]:
        """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back if it raises.

        Raises OutboxError when another writer keeps the file locked past the retries.
        """
        with self._lock:
            try:
                self._conn  # noqa: B018 - opens an outbox a full disk kept closed, or raises OutboxFullError
            except OutboxFullError:
                if not self._tried_open:  # a write refused without trying the file: count it as failed
                    self._errors["write_errors"] += 1
                    self._errors["disk_full"] += 1
                raise
            try:
                self._begin()
            except sqlite3.Error as exc:  # e.g. no space left for the write-ahead log
                raise self._failed("begin a transaction on", exc) from exc
            try:
                yield OutboxTransaction(self._conn, self.max_rows)
            except sqlite3.Error as exc:
                self._rollback()
                raise self._failed("write to", exc) from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._failed("commit to", exc) from exc
            self.generation += 1

    def _rollback(self) -> None:
        """Roll back if a transaction is still open (SQLite ends it by itself after some errors, e.g. a full
        disk, and a second ROLLBACK would raise and hide the first error)."""
        if self._conn_or_none is not None and self._conn_or_none.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback on the outbox %s failed: %s", self.path, exc)

    def _failed(self, doing: str, exc: sqlite3.Error | OSError) -> OutboxError:
        self._errors["write_errors"] += 1
        if _is_full(exc, self.path.parent):
            self._errors["disk_full"] += 1
            free = free_bytes(self.path.parent)
            err: OutboxError = OutboxFullError(
                f"disk full: cannot {doing} the outbox {self.path} ({exc}; {'?' if free is None else free} bytes "
                "free); nothing was written and every row queued before is kept; free space on that file system")
        else:
            err = OutboxError(f"cannot {doing} the outbox {self.path}: {exc}")
        self.last_error = str(err)
        return err

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self.transaction():
            return fn(self._conn)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read the outbox {self.path}: {exc}") from exc

    # ---- the link's side ---------------------------------------------------------------------------
    def peek(self, limit: int, after_id: int = 0) -> list[OutboxRow]:
        """Up to ``limit`` rows with ``id > after_id``, in id order (the order they must be sent in)."""
        with self._reading() as conn:
            rows = conn.execute("SELECT id, kind, seq, body FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                      (after_id, limit)).fetchall()
        return [OutboxRow(int(i), str(k), None if s is None else int(s), str(b)) for i, k, s, b in rows]

    def claim(self, rows: list[OutboxRow]) -> bool:
        """Mark ``rows`` (as read by ``peek``) as being handed to the broker, in one transaction, only if every one
        is still stored unchanged; False (nothing marked) when one was merged away or replaced since it was read.

        Between ``peek`` and this, the summarizer may merge never-sent rows (the row bound) or replace an unsent
        report: sending the rows as read would send a window twice (alone, and again inside the merged row), so
        the caller reads again instead. From a successful claim on, the rows are never merged."""
        if not rows:
            return True

        def check_and_mark(c: sqlite3.Connection) -> bool:
            ids = [r.id for r in rows]
            marks = ",".join("?" * len(ids))
            stored = dict(c.execute(f"SELECT id, body FROM outbox WHERE id IN ({marks})", ids).fetchall())
            if any(stored.get(r.id) != r.body for r in rows):
                return False
            c.executemany("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", [(i,) for i in ids])
            return True

        return self._write(check_and_mark)

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows; returns how many existed (a replaced report may already be gone)."""
        id_list = list(ids)
        if not id_list:
            return 0
        cur = self._write(lambda c: c.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in id_list]))
        return int(cur.rowcount)

    def depth(self) -> int:
        with self._reading() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        with self._reading() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def counters(self) -> dict[str, int]:
        """depth, summary_rows, report_rows, merged_total, overflow_unmergeable (persisted); write_errors and
        disk_full (failed writes since this process started, kept in memory); ``open`` 1, or 0 with only the
        in-memory counters while a full disk keeps the file closed."""
        if self._conn_or_none is None:
            try:
                with self._lock:
                    self._conn  # noqa: B018 - try to open it (rate-limited)
            except OutboxError:
                return {"open": 0, **self._errors}
        with self._reading() as conn:
            kinds = dict(conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
            meta = dict(conn.execute(
                f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(COUNTER_KEYS))})",
                COUNTER_KEYS).fetchall())
        out = {"open": 1, "depth": sum(int(v) for v in kinds.values()), "summary_rows": int(kinds.get(SUMMARY, 0)),
               "report_rows": int(kinds.get(REPORT, 0))}
        out.update({k: int(meta.get(k, 0)) for k in COUNTER_KEYS})
        out.update(self._errors)
        return out

    def close(self) -> None:
        with self._lock:
            if self._conn_or_none is not None:
                self._conn_or_none.close()
                self._conn_or_none = None
            self._closed = True  # closed on purpose: never opened again

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
