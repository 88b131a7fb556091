"""The local prediction log: every prediction with its model version, bounded and rotating, never raw inputs.

Hot path: the agent hands over its staged predictions as one block of records (``record_many``, every
few dozen predictions; ``record`` appends one tuple) to an in-memory deque: no I/O. A background thread
swaps the deque out once a second and appends it to the current segment as fixed-size binary records
(one buffered write of the records' bytes per flush; an SQLite insert per row cost ~20x more and, sharing
the interpreter lock, slowed the hot path measurably). Segments hold ``segment_rows`` records; the oldest
are deleted when the total exceeds ``max_rows``.

Layout (formats and the id grammar: ``predlog_format``): ``<dir>/<boot>-<n>.bin`` segments of records (counter,
time, model index, predicted class, confidence) and ``<dir>/models.json`` mapping model indexes to (name,
version). Fed-back labels go to ``labels.jsonl``. Prediction ids are ``<boot>-<counter>``; ``lookup`` scans that
boot's segments (feedback is not a hot path).

Durability:

* A label is appended to ``labels.jsonl`` and fsynced (and the folder too, when the append created the file)
  before ``set_label`` returns: a label the agent acknowledged survives a power cut. Labels are rare and typed
  by people, so an fsync per label is affordable: 200 ``Agent.feedback`` calls took 78 ms against 15 ms without
  it on the development VM's disk (p50 0.3 ms, worst 5 ms per label); an SD card's fsync can take tens of ms.
* Segments are fsynced once per flush by the log thread (once per segment file the flush wrote to; the folder
  when a segment is new), never per record and never on the hot path. A power cut loses the predictions not
  flushed yet (about the last second's) and may leave a partial last record, which reads ignore. A labelled
  prediction is on disk before its label: ``lookup`` flushes first.
* A power cut during a label append may leave a torn last line: it is skipped (and counted) when the file is
  read at start, and the next append starts on a new line.

Several processes (``device-agent serve``'s workers) may share one log folder; each has its own boot, so its own
segments. What they share is kept consistent across processes:

* ``labels.jsonl``: the check "labelled before?" and the append happen under an exclusive ``flock`` on
  ``<dir>/.lock``, after reading whatever other processes appended since (``_sync_labels_locked``: one ``fstat``,
  and the new bytes only), so a prediction is labelled once whichever worker takes the label. The rewrite that
  drops rotated-out labels happens under the same lock, from the file (not one process's memory), and keeps the
  labels of other boots' predictions newer than their segments on disk (still in their process's memory).
* ``models.json``: every write merges the map on disk with this process's under the lock (indexes already given
  never move), and ``lookup`` re-reads the map when a record names an index it does not know yet.
* A prediction another process made sits in that process's memory for up to a second or two (staged rows, then
  the log's queue). With ``share(before_flush)`` (the serve workers call it) each process answers flush
  requests (``predlog_peers``: a Linux abstract Unix socket named after the folder and its boot); ``lookup`` of
  another boot's prediction that is not on disk asks that process to flush (``before_flush`` first: the agent's
  staged rows) and reads again. A process that does not answer (gone) holds nothing more: the id is unknown.
  The hot path is unchanged: nothing is written or sent per prediction.

Faults: nothing here stops the agent or its log thread.

* ``models.json`` is written atomically (fsync). A map that cannot be read at start (a power cut under the
  old writer left it empty) is replaced by an empty one, rebuilt as models load; the segments it described
  are deleted, since their model indexes no longer say which version made them. A failed write of the map
  is retried on every flush, and no record is written until the map naming its model is on disk.
* A failed segment write (a full disk) keeps the unwritten records in memory for the next flush, at most
  ``max_pending_rows`` of the newest; older ones are dropped and counted. Any other exception in the log
  thread is logged and counted, and the thread goes on.
* ``labels.jsonl`` holds one label per prediction (a second label is refused, see ``set_label``) and is
  rewritten atomically without the labels of rotated-out predictions once it holds more than ``max_rows`` labels.
  A label that cannot be written or fsynced raises LabelWriteError, and nothing is recorded.

Counters for the agent's status (``counters()``): ``write_errors``, ``dropped``, ``corrupt_files``,
``flush_failures``, ``pending``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgefleet_contracts.atomic import atomic_write_text, fsync_dir

from .errors import AlreadyLabelledError, LabelWriteError
from .predlog_format import (
    EMPTY,
    RECORD,
    Record,
    is_boot,
    label_line,
    live_labels,
    parse_id,
    parse_labels,
    parse_prediction_id,
    scan_segments,
    segment_name,
    segment_numbers,
)
from .predlog_peers import FlushPeers

__all__ = ["RECORD", "PredictionLog", "Record", "parse_prediction_id"]

log = logging.getLogger("edgefleet.agent")


class PredictionLog:
    """Bounded, rotating log of predictions under ``directory`` (see the module docstring).

    ``max_pending_rows`` caps the records held in memory while writes fail (default: ``max_rows``, at most
    100,000); beyond it the oldest are dropped and counted in ``dropped``.
    """

    def __init__(self, directory: Path, max_rows: int = 100_000, *, segment_rows: int = 10_000,
                 flush_seconds: float = 1.0, max_pending_rows: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.segment_rows = max(1, min(segment_rows, max_rows))
        self.max_pending_rows = max(1, min(max_rows, 100_000) if max_pending_rows is None else max_pending_rows)
        self._queue: deque[Record | np.ndarray] = deque()
        self._pending = EMPTY  # records a failed write left behind, oldest first, at most max_pending_rows
        self._lock = threading.Lock()
        self.write_errors = 0  # failed writes of segments, models.json or labels.jsonl (a full disk)
        self.dropped = 0  # records given up: over max_pending_rows while writes fail, or malformed
        self.corrupt_files = 0  # unreadable models.json / labels.jsonl found at start
        self.flush_failures = 0  # unexpected exceptions in the log thread (logged; the thread goes on)
        self._failing = False  # inside a run of failed segment writes (logged when it starts and ends)
        self._boot = "boot"
        self._segment: Path | None = None
        self._segment_count = 0
        self._segment_dir_synced = False  # the current segment's folder entry is fsynced (done on its first write)
        self._models_file = self.dir / "models.json"
        self._models_dirty = False  # the in-memory map is not on disk yet: flush writes it before any record
        self._models = self._load_models()
        self._model_index = {(n, v): i for i, (n, v) in enumerate(self._models)}
        self._labels_file = self.dir / "labels.jsonl"
        self._labels_torn = False  # the file may end in a partial line: the next append starts a new one
        self._labels_dir_synced = False  # the file's folder entry is durable (it was there at start, or fsynced)
        self._labels_seen: tuple[int, int] | None = None  # (inode, bytes) of labels.jsonl read into _labels so far
        self._lock_file = self.dir / ".lock"
        self._lock_fd: int | None = None  # opened on first use; flock excludes the other processes sharing the folder
        self._labels = self._load_labels()
        self._labels_limit = max(1, self.max_rows)
        self._stop = threading.Event()
        self._peers = FlushPeers(self.dir, self.flush, self._stop)  # other processes' flush requests (``share``)
        self._thread = threading.Thread(target=self._run, args=(flush_seconds,), name="prediction-log", daemon=True)
        self._thread.start()

    # ---- across processes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """Exclusive ``flock`` on ``<dir>/.lock`` (other processes sharing the folder wait); taken after
        ``self._lock``. A lock file that cannot be opened is logged and the work done unlocked (a single process
        loses nothing by it)."""
        try:
            if self._lock_fd is None:
                self._lock_fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("prediction log: cannot lock %s (%s); going on without the cross-process lock",
                        self._lock_file, exc)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def share(self, before_flush: Callable[[], None] | None = None) -> bool:
        """Answer other processes' flush requests for this boot (``predlog_peers``); ``before_flush`` runs first
        on each (the agent hands over its staged rows). Call after the boot is set. False (and a warning) where
        it cannot listen."""
        return self._peers.listen(self._boot, before_flush)

    # ---- start-up ----------------------------------------------------------------------------------------
    def _load_models(self) -> list[list[str]]:
        try:
            doc = json.loads(self._models_file.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = str(exc) or type(exc).__name__
        else:
            if isinstance(doc, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e)
                                             for e in doc):
                return [[n, v] for n, v in doc]
            problem = "not a list of [name, version] pairs"
        self.corrupt_files += 1
        self._models_dirty = True
        stale = 0
        for seg in scan_segments(self.dir):  # their model indexes point into the lost map: they cannot be attributed
            try:
                seg.path.unlink()
                stale += seg.rows
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("prediction log: cannot delete %s (%s)", seg.path, exc)
        log.warning("prediction log: %s is unreadable (%s); starting with an empty model map (rebuilt as models "
                    "load) and deleting %d logged predictions whose model versions it held",
                    self._models_file, problem, stale)
        return []

    def _load_labels(self) -> dict[str, int]:
        try:
            with open(self._labels_file, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self.corrupt_files += 1
            self._labels_torn = True
            log.warning("prediction log: cannot read %s (%s); earlier labels are not known", self._labels_file, exc)
            return {}
        text = data.decode("utf-8", errors="replace")
        labels, bad = parse_labels(text)
        self._labels_seen = (st.st_ino, len(data))
        self._labels_dir_synced = True  # it was there before this start
        self._labels_torn = bool(text) and not text.endswith("\n")
        if bad:
            self.corrupt_files += 1
            log.warning("prediction log: skipped %d unreadable lines of %s", bad, self._labels_file)
        return labels

    def _sync_labels_locked(self) -> None:
        """Read what other processes appended to ``labels.jsonl`` since this one last looked (all of it when the
        file was rewritten: a new inode). Called under ``_shared``: nobody is appending meanwhile."""
        try:
            with open(self._labels_file, "rb") as fh:
                st = os.fstat(fh.fileno())
                seen = self._labels_seen
                if seen is not None and seen[0] == st.st_ino and seen[1] == st.st_size:
                    return
                whole = seen is None or seen[0] != st.st_ino or st.st_size < seen[1]
                if not whole:
                    fh.seek(seen[1])  # type: ignore[index]
                data = fh.read()
        except FileNotFoundError:
            if self._labels_seen is not None:  # removed under us: start from nothing, as at start
                self._labels, self._labels_seen, self._labels_torn = {}, None, False
            return
        except OSError as exc:
            log.warning("prediction log: cannot read %s (%s); checking labels against what this process knows",
                        self._labels_file, exc)
            return
        labels, _bad = parse_labels(data.decode("utf-8", errors="replace"))
        if whole:
            self._labels = labels
        else:
            for pid, lab in labels.items():
                self._labels.setdefault(pid, lab)
        self._labels_seen = (st.st_ino, (0 if whole else seen[1]) + len(data))  # type: ignore[index]
        if data:
            self._labels_torn = not data.endswith(b"\n")
        self._labels_dir_synced = True

    # ---- models ------------------------------------------------------------------------------------------
    def model_index(self, name: str, version: str) -> int:
        """Stable small integer for a model version (called when a model is loaded, not per prediction).

        Never raises for I/O: when ``models.json`` cannot be written the index still holds in memory, the
        write is retried on every flush, and no record is written to disk until it succeeds.
        """
        with self._lock:
            key = (name, version)
            i = self._model_index.get(key)
            if i is not None:
                return i
            with self._shared():  # another process may have given this version (or this index) already
                self._adopt_models_locked(self._read_models_file())
                if key not in self._model_index:
                    self._models.append([name, version])
                    self._model_index[key] = len(self._models) - 1
                    self._models_dirty = True
                if self._models_dirty:
                    self._write_models_locked()
            return self._model_index[key]

    def _read_models_file(self) -> list[list[str]] | None:
        try:
            doc = json.loads(self._models_file.read_bytes())
        except (OSError, ValueError):
            return None
        if isinstance(doc, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e)
                                         for e in doc):
            return [[n, v] for n, v in doc]
        return None

    def _adopt_models_locked(self, on_disk: list[list[str]] | None) -> None:
        """Take the map another process wrote: its entries, then this process's that it lacks. Indexes already on
        disk win (records written by others use them); one of ours that moved is logged."""
        if not on_disk or on_disk == self._models:
            return
        merged = [list(e) for e in on_disk] + [e for e in self._models if e not in on_disk]
        moved = [e for i, e in enumerate(self._models) if merged.index(e) != i]
        if moved:
            log.warning("prediction log: another process gave model indexes of %s first; records of them still in "
                        "memory may be attributed to another version", moved)
        self._models = merged
        self._model_index = {(n, v): i for i, (n, v) in enumerate(merged)}

    def _save_models_locked(self) -> bool:
        with self._shared():
            self._adopt_models_locked(self._read_models_file())
            return self._write_models_locked()

    def _write_models_locked(self) -> bool:
        try:
            atomic_write_text(self._models_file, json.dumps(self._models))
        except OSError as exc:
            self.write_errors += 1
            log.warning("prediction log: cannot write %s (%s); retrying on the next flush", self._models_file, exc)
            return False
        self._models_dirty = False
        return True

    # ---- recording (hot path: no I/O) ---------------------------------------------------------------------
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

    # ---- writing -----------------------------------------------------------------------------------------
    def flush(self, boot: str = "") -> None:
        """Append the queued records to the current segment and fsync it (the log thread calls this every
        ``flush_seconds``; feedback, ``count`` and ``close`` too). One fsync per segment file written, not per record.

        Does not raise for I/O: a failed write or fsync counts ``write_errors`` and keeps the records not yet
        durable for the next flush, at most ``max_pending_rows`` of the newest (older ones are counted in
        ``dropped``).
        """
        with self._lock:
            if boot:
                self._set_boot_locked(boot)
            items: list[Record | np.ndarray] = []
            while self._queue:  # drain in place: popleft and append are atomic, so nothing appended meanwhile is lost
                items.append(self._queue.popleft())
            if not items and not len(self._pending) and not self._models_dirty:
                return
            rows = self._rows(items)
            if self._models_dirty and not self._save_models_locked():
                self._keep(rows)  # the records name model indexes that are not on disk yet
                return
            i = 0
            try:
                while i < len(rows):
                    if self._segment is None or self._segment_count >= self.segment_rows:
                        self._new_segment()
                    assert self._segment is not None
                    take = min(len(rows) - i, self.segment_rows - self._segment_count)
                    with open(self._segment, "ab") as fh:
                        fh.write(rows[i : i + take].tobytes())
                        fh.flush()
                        os.fsync(fh.fileno())  # once per segment file per flush: this thread, never the hot path
                    if not self._segment_dir_synced:
                        fsync_dir(self.dir)  # a new segment's name, once
                        self._segment_dir_synced = True
                    self._segment_count += take
                    i += take
            except OSError as exc:
                self._write_failed(exc)
                self._keep(rows[i:])
                return
            except Exception:
                self._keep(rows[i:])
                raise
            self._pending = EMPTY
            if self._failing:
                self._failing = False
                log.warning("prediction log: writing works again (%d failed writes, %d records dropped so far)",
                            self.write_errors, self.dropped)
            self._rotate()

    def _rows(self, items: list[Record | np.ndarray]) -> np.ndarray:
        """The pending records and ``items`` as one array, in queue order; malformed records are dropped."""
        parts: list[np.ndarray] = [self._pending] if len(self._pending) else []
        run: list[Record] = []
        for item in [*items, EMPTY]:  # the empty block ends the last run of single records
            if isinstance(item, tuple):
                run.append(item)
                continue
            if run:
                parts.append(self._singles(run))
                run = []
            if len(item):
                parts.append(item)
        if not parts:
            return EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _singles(self, run: list[Record]) -> np.ndarray:
        try:
            return np.array(run, dtype=RECORD)
        except (TypeError, ValueError, OverflowError):
            good: list[np.ndarray] = []
            for r in run:
                try:
                    good.append(np.array([r], dtype=RECORD))
                except (TypeError, ValueError, OverflowError):
                    self.dropped += 1
                    log.error("prediction log: dropped malformed record %r", r)
            return np.concatenate(good) if good else EMPTY

    def _keep(self, rows: np.ndarray) -> None:
        """Hold ``rows`` (oldest first) for the next flush, at most ``max_pending_rows`` of the newest."""
        over = len(rows) - self.max_pending_rows
        if over > 0:
            self.dropped += over
            rows = rows[over:]
        self._pending = rows.copy()  # a copy: a view would keep the whole drained array alive

    def _write_failed(self, exc: OSError) -> None:
        self.write_errors += 1
        seg = self._segment
        if seg is not None:  # cut a partly written record off, or later records would be read misaligned
            try:
                if seg.exists() and seg.stat().st_size != self._segment_count * RECORD.itemsize:
                    os.truncate(seg, self._segment_count * RECORD.itemsize)
            except OSError:
                self._segment = None  # leave it as it is (reads ignore a partial last record); start a new one
        if not self._failing:
            self._failing = True
            log.warning("prediction log: cannot write to %s (%s); keeping up to %d records in memory and retrying "
                        "every flush", self.dir, exc, self.max_pending_rows)

    def _new_segment(self) -> None:
        """Start the next segment of this boot: one past the highest number on disk, never an existing one."""
        numbers = segment_numbers(os.listdir(self.dir), self._boot)
        self._segment = self.dir / segment_name(self._boot, max(numbers, default=-1) + 1)
        self._segment_count = 0
        self._segment_dir_synced = False

    def _rotate(self) -> None:
        segs = scan_segments(self.dir)
        total = sum(s.rows for s in segs)
        for seg in segs:
            if total - seg.rows < self.max_rows or seg.path == self._segment:
                break
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.write_errors += 1
                log.warning("prediction log: cannot delete %s (%s)", seg.path, exc)
                break
            total -= seg.rows

    def set_boot(self, boot: str) -> None:
        """Name the segments (and so the prediction ids) of this run. Raises ValueError for a boot that is not
        1-100 letters, digits, '_', '.' or '-'."""
        with self._lock:
            self._set_boot_locked(boot)

    def _set_boot_locked(self, boot: str) -> None:
        if not is_boot(boot):
            raise ValueError(f"boot {boot!r} must be 1-100 letters, digits, '_', '.' or '-'")
        if boot != self._boot:
            self._boot = boot
            self._segment = None  # this boot's records go to this boot's segments

    # ---- feedback ----------------------------------------------------------------------------------------
    def lookup(self, pid: str) -> tuple[str, str, int] | None:
        """(model, version, predicted class) of a logged prediction, or None if unknown or rotated out.

        Raises MalformedPredictionIdError (a FeedbackError) when ``pid`` is not a well-formed id (see
        ``parse_prediction_id``); it is checked before any file is touched. An id of another process sharing the
        folder that is not on disk yet is asked for (``share``; the module docstring).
        """
        boot, counter = parse_prediction_id(pid)
        self.flush()
        found = self._find(boot, counter)
        if found is None and boot != self._boot and self._peers.ask(boot):
            found = self._find(boot, counter)
        return found

    def _find(self, boot: str, counter: int) -> tuple[str, str, int] | None:
        with self._lock:
            tables: list[np.ndarray] = [self._pending] if boot == self._boot and len(self._pending) else []
            for seg in scan_segments(self.dir):
                if seg.boot != boot:
                    continue
                try:
                    tables.append(np.fromfile(seg.path, dtype=RECORD))
                except OSError as exc:
                    log.warning("prediction log: cannot read %s (%s)", seg.path, exc)
            for rows in tables:
                hit = np.flatnonzero(rows["counter"] == counter)
                if hit.size:
                    r = rows[hit[0]]
                    model = int(r["model"])
                    if not 0 <= model < len(self._models):  # written by a process that loaded a model since
                        self._adopt_models_locked(self._read_models_file())
                    if not 0 <= model < len(self._models):
                        return None
                    name, version = self._models[model]
                    return name, version, int(r["predicted"])
        return None

    def set_label(self, pid: str, label: int) -> None:
        """Append the fed-back class of a logged prediction to ``labels.jsonl`` and fsync it before returning.

        A prediction is labelled once: a second label for the same id (in this run or an earlier one) is
        refused with AlreadyLabelledError and nothing is recorded, so a caller that counts after this returns
        counts each prediction once. (Letting the latest label win would mean taking the first one back out of a
        window that may already have been sent.) Raises MalformedPredictionIdError for a malformed id, and
        LabelWriteError when the line cannot be written or fsynced (then nothing is recorded, and the label can
        be sent again; a line that did reach the file is harmless: on reading, the first label of an id wins).

        The file keeps only what deduplication needs: once it holds more than ``max_rows`` labels it is
        rewritten without those whose predictions have rotated out of the log.
        """
        parse_prediction_id(pid)
        with self._lock, self._shared():  # check and append as one step for every process sharing the folder
            self._sync_labels_locked()
            old = self._labels.get(pid)
            if old is not None:
                raise AlreadyLabelledError(f"prediction {pid!r} already has a label (class index {old}); a "
                                           "prediction is labelled once, so this label was not recorded or counted")
            line = label_line(pid, label)
            try:
                with open(self._labels_file, "ab") as fh:
                    fh.write(("\n" + line if self._labels_torn else line).encode())
                    fh.flush()
                    os.fsync(fh.fileno())  # acknowledged means on disk: the caller answers "ok" after this
                    st = os.fstat(fh.fileno())
                    seen = self._labels_seen
                    if seen is None or seen[0] == st.st_ino:  # nobody else wrote meanwhile: we hold the lock
                        self._labels_seen = (st.st_ino, fh.tell())
                if not self._labels_dir_synced:
                    fsync_dir(self.dir)  # this append created the file: make its name durable too
                    self._labels_dir_synced = True
            except OSError as exc:
                self.write_errors += 1
                self._labels_torn = True
                raise LabelWriteError(f"cannot save the label of {pid!r} to {self._labels_file} ({exc}); nothing "
                                      "was recorded: free space on the device and send the label again") from exc
            self._labels_torn = False
            self._labels[pid] = label
            if len(self._labels) > self._labels_limit:
                self._compact_labels_locked()

    def _compact_labels_locked(self) -> None:
        """Rewrite ``labels.jsonl`` with the labels of predictions still in the log (a prediction that has
        rotated out cannot be looked up, so it cannot be labelled again). Called under ``_shared`` with the
        labels just synced, so the rewrite starts from the whole file. A label of another boot's prediction newer
        than that boot's segments on disk is kept: the prediction may be in its process's memory still."""
        live: dict[str, set[int]] = {}
        for seg in scan_segments(self.dir):
            try:
                live.setdefault(seg.boot, set()).update(np.fromfile(seg.path, dtype=RECORD)["counter"].tolist())
            except OSError:
                return  # not knowing what is live, keep everything
        if len(self._pending):
            live.setdefault(self._boot, set()).update(self._pending["counter"].tolist())
        newest = {boot: max(counters) for boot, counters in live.items() if counters and boot != self._boot}
        keep = live_labels(self._labels, live)
        for pid, lab in self._labels.items():
            parsed = parse_id(pid)
            if parsed is not None and parsed[0] in newest and parsed[1] > newest[parsed[0]]:
                keep[pid] = lab
        try:
            text = "".join(label_line(p, lab) for p, lab in keep.items())
            atomic_write_text(self._labels_file, text)
            st = os.stat(self._labels_file)
        except OSError as exc:
            self.write_errors += 1
            log.warning("prediction log: cannot rewrite %s (%s)", self._labels_file, exc)
            return
        self._labels = keep
        self._labels_seen = (st.st_ino, st.st_size)
        self._labels_torn = False
        self._labels_dir_synced = True  # atomic_write_text fsyncs the folder
        self._labels_limit = max(self.max_rows, 2 * len(keep))  # rewrites stay rare even when most are live

    # ---- status and shutdown -----------------------------------------------------------------------------
    def count(self) -> int:
        self.flush()
        with self._lock:
            return sum(s.rows for s in scan_segments(self.dir))

    def counters(self) -> dict[str, int]:
        """write_errors, dropped, corrupt_files, flush_failures, and pending (records held after a failed write)."""
        return {"write_errors": self.write_errors, "dropped": self.dropped, "corrupt_files": self.corrupt_files,
                "flush_failures": self.flush_failures, "pending": len(self._pending)}

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.flush()
            except Exception:  # the log must outlive a bug: log it, count it, flush again next time
                self.flush_failures += 1
                if self.flush_failures in (1, 10, 100) or self.flush_failures % 1000 == 0:
                    log.exception("prediction log flush failed (%d so far); the log thread goes on",
                                  self.flush_failures)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
