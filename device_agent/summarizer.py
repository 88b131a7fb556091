"""Closing windows into summaries off the hot path: sequence numbers, k-anonymity hold-back, Laplace noise.

Runs on a background thread. A closed window becomes a Summary; if it holds fewer than ``k`` predictions it is
merged into the version's held window instead of being sent (persisted, so a restart loses nothing). The
sequence counter, the held windows and the enqueued summary are written in ONE outbox transaction.

**A full disk holds windows in memory, it does not lose them.** When that transaction fails with
``OutboxFullError`` nothing of it was written (no row, no ``next_seq`` bump, no held-for-k update, no
``epsilon_spent``). The window is then held in memory, one pending summary per (model, version): the next window
of that version is merged into it (counts add, ``windows`` counts the raw windows), so memory stays constant
however long the disk stays full. Held windows are written again, merged, at the next close of any window and
every ``retry_seconds`` on the worker thread; the first write that succeeds carries all of them. Then:

- **Sequence numbers.** ``seq`` is read from ``next_seq`` inside the transaction that stores the row and bumps
  the counter; a failed write rolls both back, so the number it tried was never on a stored row and the
  successful write takes it. Stored rows keep contiguous, unique, increasing ``seq`` values, which is what the
  server's idempotent ingest on (device, seq) needs. A held window has no ``seq`` of its own.
- **Differential privacy.** Noise is drawn only at the moment a summary is written, on a copy
  (:func:`add_laplace_noise` leaves its input alone), together with the ``epsilon_spent`` update. Held windows
  (for k or for a full disk) keep their exact counts and never leave the device. A write that fails discards
  its noisy copy unseen and rolls back its ``epsilon_spent``; the merged summary that is finally stored gets
  noise once, and spends ``epsilon`` once, for all the windows it carries (one release).
- **Bound.** At most ``max_held_versions`` (default 4) model versions hold a window at a time (a version
  change while the disk is full starts a new one). Beyond that, the version held longest without a new window
  is dropped: logged as an error and counted in ``windows_lost`` / ``predictions_lost`` (0 in normal service).
- **Shutdown.** ``stop()`` tries once more to write what is held; what still cannot be written (the disk is
  still full) cannot be kept anywhere: it is logged as an error and counted as lost.
- **Counters** (read by ``Agent.status()``): ``windows_held_disk_full`` (raw windows held in memory now),
  ``windows_recovered`` (raw windows written after being held), ``windows_lost`` and ``predictions_lost``.
  ``failures`` still counts windows lost to any other error; a window held for a full disk is not a failure.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.summary import Summary, merge, noise_variance

from .outbox import OutboxFullError
from .window import Window

log = logging.getLogger("edgefleet.agent")


class SummaryTx(Protocol):
    def put_summary(self, summary: Summary) -> None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def get_meta(self, key: str) -> str | None: ...


class SummarySink(Protocol):
    def transaction(self) -> Any: ...
    def get_meta(self, key: str) -> str | None: ...


class MemorySink:
    """An in-process sink (tests, benchmarks, a device with no outbox configured)."""

    def __init__(self) -> None:
        self.summaries: list[Summary] = []
        self.reports: list[dict[str, Any]] = []
        self.meta: dict[str, str] = {}

    @contextmanager
    def transaction(self) -> Iterator[MemorySink]:
        yield self

    def put_summary(self, summary: Summary) -> None:
        self.summaries.append(summary)

    def put_report(self, report: dict[str, Any]) -> None:
        self.reports = [report]

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value

    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)


@dataclass
class Closed:
    window: Window
    model: str
    version: str
    start: str
    end: str
    done: threading.Event | None = None


def add_laplace_noise(s: Summary, epsilon: float, rng: np.random.Generator) -> Summary:
    """A copy of ``s`` with Laplace(1/epsilon) noise on every histogram count, rounded; ``s`` is left as it was.
    Each histogram is a disjoint partition, so one summary spends ``epsilon`` per histogram (reported as
    epsilon_spent).

    Counts are *not* clipped at zero, so they can be negative: the rounded noise is symmetric, so a released
    count is an unbiased estimate of the true one and sums over many releases stay unbiased (the server clips
    after adding). Clipping each release, as this did before, gave every empty bin ≈ 1/(2·epsilon) phantom
    counts per window, and a scope of a few hundred windows then showed output drift that was only noise.
    ``noise_variance`` gains the variance added to each count (2/epsilon² for Laplace, plus 1/12 for the
    rounding) so the server can weigh the noise (see ``edgefleet_contracts.summary``)."""

    def noisy(counts: list[int]) -> list[int]:
        a = np.asarray(counts, dtype=np.float64) + rng.laplace(0.0, 1.0 / epsilon, size=len(counts))
        return np.rint(a).astype(int).tolist()

    s = copy.deepcopy(s)
    for f in s.features:
        f.counts = noisy(f.counts)
    s.class_counts = noisy(s.class_counts)
    s.confidence_counts = noisy(s.confidence_counts)
    s.epsilon = epsilon
    s.epsilon_spent = s.epsilon_spent + epsilon
    s.noise_variance = s.noise_variance + noise_variance(epsilon)
    return s


MAX_HELD_VERSIONS = 4
RETRY_SECONDS = 2.0


class Summarizer:
    """Closes windows on its own thread (``submit``) or the caller's (``close``); see the module docstring."""

    def __init__(self, device_id: str, sink: SummarySink, k: int, epsilon: float = 0.0, seed: int | None = None,
                 *, retry_seconds: float = RETRY_SECONDS, max_held_versions: int = MAX_HELD_VERSIONS) -> None:
        if max_held_versions < 1:
            raise ValueError(f"max_held_versions must be at least 1, got {max_held_versions}")
        self.device_id = device_id
        self.sink = sink
        self.k = k
        self.epsilon = epsilon
        self.retry_seconds = retry_seconds
        self.max_held_versions = max_held_versions
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[Closed | None] = queue.Queue()
        self._lock = threading.Lock()  # one writer: the worker thread, a direct close() or retry()
        # Windows that could not be written because the disk is full, merged per (model, version); the dict's
        # order is the order in which they last took a window (the first is the one dropped past the bound).
        self._unstored: dict[tuple[str, str], Summary] = {}
        self.emitted = 0
        self.held = 0
        self.failures = 0
        self.windows_held_disk_full = 0
        self.windows_recovered = 0
        self.windows_lost = 0
        self.predictions_lost = 0
        self._thread = threading.Thread(target=self._run, name="summarizer", daemon=True)
        self._thread.start()

    def submit(self, closed: Closed) -> None:
        self._queue.put(closed)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.retry_seconds if self._unstored else None)
            except queue.Empty:
                self._retry_quietly()
                continue
            if item is None:
                self._shutdown()
                return
            try:
                self.close(item)
            except Exception:  # never let one bad window kill summarising; it is logged and counted
                self.failures += 1
                log.exception("closing a window failed")
            finally:
                if item.done is not None:
                    item.done.set()

    def close(self, c: Closed) -> Summary | None:
        """Turn a closed window into a sent or held summary, atomically with the sequence counter.

        Returns the stored summary, or None when the window was held (below k, or the disk is full). Windows
        held for a full disk are written too when this one could be. Raises what the sink raises, except
        OutboxFullError.
        """
        with self._lock:
            if c.window.count == 0 and not c.window.errors and c.window.confusion is None:
                self._retry_locked(quiet=True)
                return None
            # The wall clock stepped back while the window was open: its end is before its start, which no
            # reader accepts (and a held window like that would break every later merge). Keep the later time.
            start = c.end if c.end < c.start else c.start  # one ISO format: text order is time order
            s = c.window.to_summary(self.device_id, c.model, c.version, 0, start, c.end)
            key = (c.model, c.version)
            pending = self._unstored.get(key)
            if pending is not None:
                try:
                    s = merge(pending, s)
                except SchemaError as exc:  # cannot happen within one version's bins; never block it for good
                    self._drop(key, f"it cannot be merged with the next window ({exc})")
                    pending = None
            try:
                out = self._write(s)
            except OutboxFullError as exc:
                self._unstored.pop(key, None)
                self._unstored[key] = s  # the newest now
                self._enforce_bound()
                self._count_held()
                log.warning("the disk is full: the window of %s %s (%d predictions) is held in memory, %d raw "
                            "window(s) of that version in all; it is merged into the next window written: %s",
                            c.model, c.version, c.window.count, s.windows, exc)
                return None
            if pending is not None:
                self._recovered(key, pending)
            self._retry_locked(quiet=True)
            return out

    def retry(self) -> int:
        """Write the windows held for a full disk now; returns how many raw windows were written.

        Raises OutboxFullError (they stay held) when the disk is still full, and what else the sink raises.
        """
        with self._lock:
            return self._retry_locked()

    def _retry_locked(self, quiet: bool = False) -> int:
        """Write each held window; stop at the first OutboxFullError (raised unless ``quiet``)."""
        done = 0
        for key in list(self._unstored):
            pending = self._unstored[key]
            try:
                self._write(pending)
            except OutboxFullError:
                if quiet:
                    break
                raise
            self._recovered(key, pending)
            done += pending.windows
        return done

    def _retry_quietly(self) -> None:
        try:
            self.retry()
        except OutboxFullError:
            pass  # still full: held, tried again later
        except Exception:  # same policy as a failed close: log, count, keep summarising
            self.failures += 1
            log.exception("writing the windows held for a full disk failed")

    def _write(self, s: Summary) -> Summary | None:
        """One outbox transaction: hold ``s`` for k or store it with the next seq. ``s`` is not changed."""
        key = f"held:{s.model}:{s.version}"
        with self.sink.transaction() as tx:
            held_raw = tx.get_meta(key)
            if held_raw:
                s = self._merge_held(held_raw, s)
            if s.count < self.k:
                tx.set_meta(key, json.dumps(s.to_dict()))
                held_for_k = True
            else:
                held_for_k = False
                if held_raw:
                    tx.set_meta(key, "")
                seq = int(tx.get_meta("next_seq") or "1")
                s = copy.deepcopy(s)
                s.seq = seq
                if self.epsilon > 0:
                    s = add_laplace_noise(s, self.epsilon, self._rng)
                    spent = float(tx.get_meta("epsilon_spent") or 0.0) + self.epsilon
                    tx.set_meta("epsilon_spent", repr(spent))
                tx.put_summary(s)
                tx.set_meta("next_seq", str(seq + 1))
        if held_for_k:
            self.held += 1
            return None
        self.emitted += 1
        return s

    def _merge_held(self, held_raw: str, s: Summary) -> Summary:
        """``s`` merged with the window held for k, or ``s`` alone when the held one cannot be read or merged (a
        damaged outbox, or one kept by another agent version whose summaries no longer pass the contract): then
        that held window is dropped, counted in ``windows_lost`` and logged, rather than failing every window of
        the version from then on. The caller's transaction clears or replaces the held window."""
        try:
            return merge(Summary.from_dict(json.loads(held_raw)), s)
        except (ValueError, SchemaError) as exc:  # json.JSONDecodeError is a ValueError
            self.failures += 1
            self.windows_lost += 1
            log.error("the window held below k for %s %s cannot be used (%s); it is dropped and this window goes on "
                      "alone", s.model, s.version, exc)
            return s

    def _recovered(self, key: tuple[str, str], pending: Summary) -> None:
        del self._unstored[key]
        self.windows_recovered += pending.windows
        self._count_held()
        log.info("disk space is back: %d window(s) of %s %s (%d predictions) held while the disk was full are "
                 "written", pending.windows, key[0], key[1], pending.count)

    def _enforce_bound(self) -> None:
        while len(self._unstored) > self.max_held_versions:
            oldest = next(iter(self._unstored))
            self._drop(oldest, f"more than {self.max_held_versions} model versions hold windows for a full disk")

    def _drop(self, key: tuple[str, str], why: str) -> None:
        s = self._unstored.pop(key)
        self.windows_lost += s.windows
        self.predictions_lost += s.count
        self._count_held()
        log.error("LOST %d window(s) of %s %s (%d predictions, %s .. %s) held while the disk was full: %s",
                  s.windows, key[0], key[1], s.count, s.start, s.end, why)

    def _count_held(self) -> None:
        self.windows_held_disk_full = sum(s.windows for s in self._unstored.values())

    def _shutdown(self) -> None:
        """Last chance for the windows held for a full disk; what cannot be written now is lost (logged)."""
        with self._lock:
            try:
                self._retry_locked()
            except Exception as exc:  # noqa: BLE001 - whatever stops the write, the shutdown goes on
                for key in list(self._unstored):
                    self._drop(key, f"the agent is shutting down and they cannot be written ({exc})")

    def stop(self, timeout: float = 10.0) -> None:
        """Close the queued windows, try once more to write what is held for a full disk, end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
