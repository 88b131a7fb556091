"""The batch pattern: precompute predictions into a key-value table that the local API serves by key.

``device-agent batch --dir D --input DATA --store KV.sqlite``. DATA is a UTF-8 CSV whose ``key`` column names each
row (the other columns are the model's named features; a ``label`` column is ignored), an ``.npz`` with ``x``
(and optional ``keys``, one per row of ``x``), or an image folder (key = path relative to the folder).
Predictions go through the same agent — validated, counted in summaries like any other — and are written in
transactions of 500 rows (INSERT OR REPLACE: re-running a batch refreshes it).

A bad row is recorded with its error, not fatal: a value the model refuses (its kind and message, as the local
API gives them), a non-numeric cell (``invalid_input``, naming the column and the value), a CSV row with more or
fewer fields than the header (``wrong_shape``). Each is stored under its key as ``{"error": kind, "detail": …}``
and counted in the window like any refused input. A row whose key is empty, or repeats an earlier row's key, has
nowhere to be stored: it is not predicted, and is reported (``report``) and counted as ``skipped``.

A file that cannot be read at all (not UTF-8, not an ``.npz``, no ``x``, keys that do not match ``x``) raises
BatchError naming the file and the problem; a store that cannot be opened or written raises StoreError. Either
way, every prediction made before it is in the store: nothing computed is lost.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import pickle
import sqlite3
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AgentError, InferenceError, InputError
from .validation import listed

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
log = logging.getLogger("edgefleet.agent")

Row = tuple[str, str, str, str, float]


class BatchError(AgentError):
    """The batch input cannot be read (the message names the file, and the line or array)."""

    reason = "batch_input"


class StoreError(AgentError):
    """The key-value store cannot be opened or written (the message names the file)."""

    reason = "kv_store"


class KVStore:
    """The batch results, by key, in one SQLite file. Raises StoreError naming the file when it cannot be opened."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"cannot open the key-value store {self.path}: it is a folder; --store names a SQLite "
                             "file")
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (key TEXT PRIMARY KEY, outputs TEXT NOT NULL,"
                " model TEXT NOT NULL, version TEXT NOT NULL, at REAL NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the key-value store {self.path}: {exc}") from None

    def put_many(self, rows: list[Row]) -> None:
        """Write ``rows`` in one transaction. Raises StoreError naming the file (a full disk, a locked file)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the key-value store {self.path}: {exc}") from None
        try:
            self.db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write to the key-value store {self.path}: {exc}") from None
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT outputs, model, version, at FROM predictions WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {"key": key, "outputs": json.loads(row[0]), "model": row[1], "version": row[2], "at": row[3]}

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])


@dataclass(frozen=True)
class _RowError:
    """A row that is wrong before the model sees it (``kind`` as the window counts it, ``detail`` for the store)."""

    kind: str
    detail: str


@dataclass(frozen=True)
class _Cell:
    """The first non-numeric cell of a CSV row: the agent refuses the row as ``invalid_input`` for it."""

    column: str
    value: str


# ---- reading the inputs: (where, key, item, first bad cell) ---------------------------------------------------
Item = tuple[str, str, Any, _Cell | None]


def _items(path: Path) -> Iterator[Item]:
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                key = str(f.relative_to(path))
                yield key, key, f.read_bytes(), None
    elif path.suffix.lower() == ".npz":
        yield from _npz_items(path)
    elif path.suffix.lower() == ".csv":
        yield from _csv_items(path)
    else:
        raise BatchError(f"{path}: batch input must be a .csv with a key column, an .npz, or an image folder")


def _npz_items(path: Path) -> Iterator[Item]:
    x, keys = _read_npz(path)
    for i, (key, row) in enumerate(zip(keys, x, strict=True)):
        yield f"x[{i}]", key, row, None


def _read_npz(path: Path) -> tuple[np.ndarray, list[str]]:
    """``x`` as float32 and its keys (``keys`` as strings, else the row numbers). Raises BatchError."""
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError):
        raise BatchError(f"{path} is not an .npz archive (np.savez writes one)") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise BatchError(f"{path} is not an .npz archive (np.savez writes one): it holds a single array")
    with z:
        if "x" not in z.files:
            held = listed(list(z.files), 10) or "no arrays"
            raise BatchError(f"{path} has no array 'x' (it holds {held}); a batch .npz holds x (and optional keys)")
        x = _array(z, "x", path)
        keys_array = _array(z, "keys", path) if "keys" in z.files else None
    if x.dtype.kind not in "biuf":
        what = {"U": "text", "S": "bytes", "O": "objects", "c": "complex numbers"}.get(x.dtype.kind, "dates")
        raise BatchError(f"{path}: x must be a numeric array, not {what} (dtype {x.dtype.str})")
    if x.ndim == 0:
        raise BatchError(f"{path}: x must be an array of rows, not a single number")
    if keys_array is None:
        return x.astype(np.float32), [str(i) for i in range(len(x))]
    if keys_array.ndim != 1 or keys_array.dtype.kind not in "USiu":
        raise BatchError(f"{path}: keys must be a 1-D array of strings or integers, not {keys_array.dtype.str} of "
                         f"shape {list(keys_array.shape)}")
    if len(keys_array) != len(x):
        raise BatchError(f"{path} has {len(keys_array)} keys for {len(x)} rows of x; it needs one key per row")
    try:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys_array.tolist()]
    except UnicodeDecodeError:
        raise BatchError(f"{path}: keys must be text; some are bytes that are not UTF-8") from None
    return x.astype(np.float32), keys


def _array(z: Any, name: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(z[name])
    except ValueError:  # an object array, which only pickle reads
        raise BatchError(f"{path}: {name} cannot be read without pickle (an object array?); save numbers") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BatchError(f"{path}: {name} cannot be read: {exc}") from None


def _lines(path: Path, fh: Any) -> Iterator[str]:
    """The file's lines as text; BatchError naming the line for one that is not UTF-8 (or a UTF-16 file)."""
    for n, raw in enumerate(fh, start=1):
        if n == 1:
            if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise BatchError(f"{path} is UTF-16 text; a batch CSV must be UTF-8 (save it as UTF-8)")
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if b"\x00" in raw:
            raise BatchError(f"{path}: line {n} is not text (a NUL byte); a batch CSV must be UTF-8 text")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BatchError(f"{path}: line {n} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); a batch CSV must "
                             "be UTF-8") from None


def _csv_items(path: Path) -> Iterator[Item]:
    with open(path, "rb") as fh:
        reader = csv.reader(_lines(path, fh))
        try:
            header = next(reader, [])
            if "key" not in header:
                shown = listed(header, 20)
                raise BatchError(f"{path} needs a 'key' column naming each row; its header has "
                                 f"{shown or 'no columns'}")
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise BatchError(f"{path}: the header names {', '.join(map(repr, twice))} more than once")
            k = header.index("key")
            columns = [(j, c) for j, c in enumerate(header) if c not in ("key", "label")]
            for row in reader:
                if not row:
                    continue  # a blank line
                where = f"line {reader.line_num}"
                key = row[k] if k < len(row) else ""
                if len(row) != len(header):
                    yield where, key, _RowError("wrong_shape", f"{where} has {len(row)} fields, the header has "
                                                               f"{len(header)}"), None
                    continue
                fields: dict[str, Any] = {}
                bad: _Cell | None = None
                for j, c in columns:
                    cell = row[j]
                    try:
                        fields[c] = float(cell) if cell != "" else None
                    except ValueError:
                        fields[c] = cell  # the agent refuses it as invalid_input, naming the column
                        bad = bad or _Cell(c, cell)
                yield where, key, fields, bad
        except csv.Error as exc:
            raise BatchError(f"{path}: line {reader.line_num}: {exc}") from None


# ---- predicting and storing --------------------------------------------------------------------------------
def run_batch(agent: Any, input_path: Path, store: KVStore, chunk: int = 500, *,
              report: Callable[[str], None] | None = None) -> dict[str, int]:
    """Predict every item and store it by key. Returns counts: ``stored`` (predictions), ``rejected`` (errors
    recorded under their keys) and, when some rows were not predicted for want of a usable key, ``skipped``;
    each of those is told to ``report`` (default: a warning in the log).

    Raises BatchError (the input cannot be read), StoreError (nor the store written), NoModelError; the rows
    predicted before are stored all the same.
    """
    path = Path(input_path)
    if not path.exists():
        raise BatchError(f"batch input {path} does not exist")
    guard = agent.batch() if hasattr(agent, "batch") else contextlib.nullcontext()
    with guard:  # a model swap waits until the batch is done, so one batch is one model version
        return _Run(agent, store, chunk, report or log.warning).over(path)


class _Run:
    def __init__(self, agent: Any, store: KVStore, chunk: int, report: Callable[[str], None]) -> None:
        self.agent, self.store, self.chunk, self.report = agent, store, chunk, report
        self.pending: list[Row] = []
        self.seen: dict[str, str] = {}  # key -> where it was first seen
        self.counts = {"stored": 0, "rejected": 0}

    def over(self, path: Path) -> dict[str, int]:
        try:
            for where, key, item, bad in _items(path):
                self._one(where, key, item, bad)
        except BatchError as exc:
            done = self.counts["stored"] + self.counts["rejected"]
            self._flush()
            if done:
                raise BatchError(f"{exc} (the {done} rows before it were predicted and stored)") from None
            raise
        finally:
            self._flush()  # nothing computed is lost, whatever stopped the batch
        return self.counts

    def _one(self, where: str, key: str, item: Any, bad: _Cell | None) -> None:
        if not key.strip():
            self._skip(f"{where} has an empty key: not predicted")
            return
        if key in self.seen:
            self._skip(f"{where} repeats the key {key!r} of {self.seen[key]}: not predicted (each row needs its "
                       "own key)")
            return
        self.seen[key] = where
        if isinstance(item, _RowError):
            reject = getattr(self.agent, "_reject", None)
            if reject is not None:
                reject(item.kind, None)  # counted in the window like any refused input
            self._error(key, item.kind, item.detail)
            return
        try:
            p = self.agent.predict(item)
        except InputError as exc:
            detail = (f"{where}: column {bad.column!r} has the non-numeric value {bad.value[:40]!r}"
                      if bad is not None and exc.feature == bad.column else f"{where}: {exc}")
            self._error(key, exc.kind, detail)
        except InferenceError as exc:
            self._error(key, "inference", f"{where}: {exc}")
        else:
            out = json.dumps({"label": p.label, "class_index": p.class_index, "confidence": p.confidence,
                              "probabilities": [float(v) for v in p.probabilities], "prediction_id": p.prediction_id})
            self._put((key, out, p.model, p.version, time.time()), "stored")

    def _error(self, key: str, kind: str, detail: str) -> None:
        m = self.agent.model
        self._put((key, json.dumps({"error": kind, "detail": detail}), m.name if m else "", m.version if m else "",
                   time.time()), "rejected")

    def _skip(self, message: str) -> None:
        self.counts["skipped"] = self.counts.get("skipped", 0) + 1
        self.report(message)

    def _put(self, row: Row, count: str) -> None:
        self.pending.append(row)
        self.counts[count] += 1
        if len(self.pending) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        rows, self.pending = self.pending, []
        if rows:
            self.store.put_many(rows)
