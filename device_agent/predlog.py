"""The local prediction log: every prediction with its model version, bounded and rotating, never raw inputs.

Hot path: the agent hands over its staged predictions as one block of records (``record_many``, every
few dozen predictions; ``record`` appends one tuple) to an in-memory deque: no I/O. A background thread
swaps the deque out once a second and appends it to the current segment as fixed-size binary records
(``np.ndarray.tofile``: one write per flush, ~0.5 µs of interpreter time per row; an SQLite insert per row
cost ~20x more and, sharing the interpreter lock, slowed the hot path measurably). Segments hold
``segment_rows`` records; the oldest are deleted when the total exceeds ``max_rows``.

Layout: ``<dir>/<boot>-<n>.bin`` segments of records (counter, time, model index, predicted class, confidence)
and ``<dir>/models.json`` mapping model indexes to (name, version). Fed-back labels go to ``labels.jsonl``.
Prediction ids are ``<boot>-<counter>``; ``lookup`` scans that boot's segments (feedback is not a hot path).
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from pathlib import Path

import numpy as np

RECORD = np.dtype([("counter", "<i8"), ("at", "<f8"), ("model", "<i4"), ("predicted", "<i4"),
                   ("confidence", "<f4")])


class PredictionLog:
    def __init__(self, directory: Path, max_rows: int = 100_000, *, segment_rows: int = 10_000,
                 flush_seconds: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.segment_rows = max(1, min(segment_rows, max_rows))
        self._queue: deque[tuple[int, float, int, int, float] | np.ndarray] = deque()
        self._lock = threading.Lock()
        self._models_file = self.dir / "models.json"
        self._models: list[list[str]] = (
            json.loads(self._models_file.read_text()) if self._models_file.exists() else []
        )
        self._model_index = {(n, v): i for i, (n, v) in enumerate(self._models)}
        self._segment: Path | None = None
        self._segment_count = 0
        self.write_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(flush_seconds,), name="prediction-log", daemon=True)
        self._thread.start()

    def model_index(self, name: str, version: str) -> int:
        """Stable small integer for a model version (called when a model is loaded, not per prediction)."""
        key = (name, version)
        if key not in self._model_index:
            with self._lock:
                self._models.append([name, version])
                self._model_index[key] = len(self._models) - 1
                tmp = self._models_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._models))
                os.replace(tmp, self._models_file)
        return self._model_index[key]

    def record(self, counter: int, at: float, model: int, predicted: int, confidence: float) -> None:
        self._queue.append((counter, at, model, predicted, confidence))

    def record_many(self, counters: np.ndarray, at: np.ndarray, model: int, predicted: np.ndarray,
                    confidence: np.ndarray) -> None:
        """Queue a block of predictions (equal-length arrays; one model version) as one item."""
        block = np.empty(len(counters), dtype=RECORD)
        block["counter"] = counters
        block["at"] = at
        block["model"] = model
        block["predicted"] = predicted
        block["confidence"] = confidence
        self._queue.append(block)

    def flush(self, boot: str = "") -> None:
        with self._lock:
            q: list[tuple[int, float, int, int, float] | np.ndarray] = []
            while self._queue:  # drain in place: popleft and append are atomic, so nothing appended meanwhile is lost
                q.append(self._queue.popleft())
            if not q:
                return
            singles = [r for r in q if isinstance(r, tuple)]
            blocks: list[np.ndarray] = [r for r in q if isinstance(r, np.ndarray)]
            if singles:
                blocks.append(np.array(singles, dtype=RECORD))
            rows = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
            self._boot = boot or getattr(self, "_boot", "boot")
            i = 0
            while i < len(rows):
                if self._segment is None or self._segment_count >= self.segment_rows:
                    self._new_segment()
                assert self._segment is not None
                take = min(len(rows) - i, self.segment_rows - self._segment_count)
                try:
                    with open(self._segment, "ab") as fh:
                        rows[i : i + take].tofile(fh)
                except OSError:
                    self.write_errors += 1
                    self._queue.extendleft(reversed(q))  # keep them for the next attempt
                    return
                self._segment_count += take
                i += take
            self._rotate()

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.bin"), key=lambda p: p.stat().st_mtime_ns)

    def _new_segment(self) -> None:
        n = len(list(self.dir.glob(f"{self._boot}-*.bin")))
        self._segment = self.dir / f"{self._boot}-{n:06d}.bin"
        self._segment_count = 0

    def _rotate(self) -> None:
        segs = self._segments()
        total = sum(p.stat().st_size for p in segs) // RECORD.itemsize
        while segs and total - segs[0].stat().st_size // RECORD.itemsize >= self.max_rows and segs[0] != self._segment:
            total -= segs[0].stat().st_size // RECORD.itemsize
            segs.pop(0).unlink()

    def set_boot(self, boot: str) -> None:
        self._boot = boot

    def lookup(self, pid: str) -> tuple[str, str, int] | None:
        """(model, version, predicted class) of a logged prediction, or None if unknown or rotated out."""
        boot, _, num = pid.rpartition("-")
        if not boot or not num.isdigit():
            return None
        self.flush()
        counter = int(num)
        with self._lock:
            for seg in self.dir.glob(f"{boot}-*.bin"):
                rows = np.fromfile(seg, dtype=RECORD)
                hit = np.flatnonzero(rows["counter"] == counter)
                if hit.size:
                    r = rows[hit[0]]
                    name, version = self._models[int(r["model"])]
                    return name, version, int(r["predicted"])
        return None

    def set_label(self, pid: str, label: int) -> None:
        with self._lock, open(self.dir / "labels.jsonl", "a") as fh:
            fh.write(json.dumps({"id": pid, "label": label}) + "\n")

    def count(self) -> int:
        self.flush()
        with self._lock:
            return sum(p.stat().st_size for p in self._segments()) // RECORD.itemsize

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
