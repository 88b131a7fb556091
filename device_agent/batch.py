"""The batch pattern: precompute predictions into a key-value table that the local API serves by key.

``device-agent batch --dir D --input DATA --store KV.sqlite``. DATA is a CSV whose ``key`` column names each
row (the other columns are the model's named features), an ``.npz`` with ``x`` (and optional ``keys``), or an
image folder (key = path relative to the folder). Predictions go through the same agent — validated, counted in
summaries like any other — and are written in transactions of 500 rows (INSERT OR REPLACE: re-running a batch
refreshes it). A bad row is recorded with its error, not fatal.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AgentError, InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


class BatchError(AgentError):
    """The batch input cannot be read."""

    reason = "batch_input"


class KVStore:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS predictions (key TEXT PRIMARY KEY, outputs TEXT NOT NULL,"
            " model TEXT NOT NULL, version TEXT NOT NULL, at REAL NOT NULL)"
        )

    def put_many(self, rows: list[tuple[str, str, str, str, float]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT outputs, model, version, at FROM predictions WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {"key": key, "outputs": json.loads(row[0]), "model": row[1], "version": row[2], "at": row[3]}

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])


def _items(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                yield str(f.relative_to(path)), f.read_bytes()
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            x = np.asarray(z["x"], dtype=np.float32)
            keys = [str(k) for k in z["keys"]] if "keys" in z else [str(i) for i in range(len(x))]
        yield from zip(keys, x, strict=True)
    elif path.suffix == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "key" not in reader.fieldnames:
                have = reader.fieldnames or []
                shown = ", ".join(repr(c) for c in have[:20]) + (f", … ({len(have)} in all)" if len(have) > 20 else "")
                raise BatchError(f"{path} needs a 'key' column naming each row; its header has "
                                 f"{shown or 'no columns'}")
            for i, rec in enumerate(reader):
                key = rec.pop("key")
                rec.pop("label", None)
                try:
                    yield key, {k: float(v) if v != "" else None for k, v in rec.items()}
                except ValueError:
                    yield key or str(i), {"__bad__": f"row {i + 2} has a non-numeric value"}
    else:
        raise BatchError(f"{path}: batch input must be a .csv with a key column, an .npz, or an image folder")


def run_batch(agent: Any, input_path: Path, store: KVStore, chunk: int = 500) -> dict[str, int]:
    """Predict every item and store it by key. Returns counts: stored, rejected."""
    if not Path(input_path).exists():
        raise BatchError(f"batch input {input_path} does not exist")
    stored = rejected = 0
    pending: list[tuple[str, str, str, str, float]] = []
    guard = agent.batch() if hasattr(agent, "batch") else contextlib.nullcontext()
    with guard:  # a model swap waits until the batch is done, so one batch is one model version
        return _run(agent, input_path, store, chunk, stored, rejected, pending)


def _run(agent: Any, input_path: Path, store: KVStore, chunk: int, stored: int, rejected: int,
         pending: list[tuple[str, str, str, str, float]]) -> dict[str, int]:
    for key, item in _items(Path(input_path)):
        try:
            p = agent.predict(item)
            out = json.dumps({"label": p.label, "class_index": p.class_index, "confidence": p.confidence,
                              "probabilities": [float(v) for v in p.probabilities], "prediction_id": p.prediction_id})
            pending.append((key, out, p.model, p.version, time.time()))
            stored += 1
        except InputError as exc:
            m = agent.model
            pending.append((key, json.dumps({"error": exc.kind, "detail": str(exc)}), m.name if m else "",
                            m.version if m else "", time.time()))
            rejected += 1
        if len(pending) >= chunk:
            store.put_many(pending)
            pending = []
    if pending:
        store.put_many(pending)
    return {"stored": stored, "rejected": rejected}
