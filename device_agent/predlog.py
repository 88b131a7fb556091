"""The local prediction log: every prediction with its model version, bounded and rotating, never raw inputs.

``record`` appends to an in-memory queue (no I/O on the hot path); a background thread writes batches to
SQLite and deletes the oldest rows beyond ``max_rows``. ``lookup`` (for label feedback) flushes first.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from pathlib import Path


class PredictionLog:
    def __init__(self, path: Path, max_rows: int = 100_000, flush_seconds: float = 0.5) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self._queue: deque[tuple[str, float, str, str, int, float]] = deque()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS predictions (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,"
            " at REAL NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, predicted INTEGER NOT NULL,"
            " confidence REAL NOT NULL, label INTEGER)"
        )
        self.write_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(flush_seconds,), name="prediction-log", daemon=True)
        self._thread.start()

    def record(self, pid: str, at: float, model: str, version: str, predicted: int, confidence: float) -> None:
        self._queue.append((pid, at, model, version, predicted, confidence))

    def flush(self) -> None:
        with self._lock:
            rows = []
            while self._queue:
                rows.append(self._queue.popleft())
            if not rows:
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO predictions (id, at, model, version, predicted, confidence)"
                    " VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute(
                    "DELETE FROM predictions WHERE n <= (SELECT MAX(n) FROM predictions) - ?", (self.max_rows,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._queue.extendleft(reversed(rows))  # keep them for the next attempt
                raise

    def lookup(self, pid: str) -> tuple[str, str, int] | None:
        """(model, version, predicted class) of a logged prediction, or None if unknown or rotated out."""
        self.flush()
        with self._lock:
            row = self._db.execute("SELECT model, version, predicted FROM predictions WHERE id = ?", (pid,)).fetchone()
        return (str(row[0]), str(row[1]), int(row[2])) if row else None

    def set_label(self, pid: str, label: int) -> None:
        with self._lock:
            self._db.execute("UPDATE predictions SET label = ? WHERE id = ?", (label, pid))

    def count(self) -> int:
        self.flush()
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.flush()
            except sqlite3.Error:
                self.write_errors += 1  # retried on the next tick; the queue keeps the rows

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        with self._lock:
            self._db.close()
