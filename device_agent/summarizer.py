"""Closing windows into summaries off the hot path: sequence numbers, k-anonymity hold-back, Laplace noise.

Runs on a background thread. A closed window becomes a Summary; if it holds fewer than ``k`` predictions it is
merged into the version's held window instead of being sent (persisted, so a restart loses nothing). The
sequence counter, the held windows and the enqueued summary are written in ONE outbox transaction.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgefleet_contracts.summary import Summary, merge

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
    """Laplace(1/epsilon) noise on every histogram count (rounded, clipped at 0). Each histogram is a
    disjoint partition, so one window spends ``epsilon`` per histogram (reported as epsilon_spent)."""

    def noisy(counts: list[int]) -> list[int]:
        a = np.asarray(counts, dtype=np.float64) + rng.laplace(0.0, 1.0 / epsilon, size=len(counts))
        return np.clip(np.rint(a), 0, None).astype(int).tolist()

    for f in s.features:
        f.counts = noisy(f.counts)
    s.class_counts = noisy(s.class_counts)
    s.confidence_counts = noisy(s.confidence_counts)
    s.epsilon = epsilon
    s.epsilon_spent = s.epsilon_spent + epsilon
    return s


class Summarizer:
    def __init__(self, device_id: str, sink: SummarySink, k: int, epsilon: float = 0.0, seed: int | None = None):
        self.device_id = device_id
        self.sink = sink
        self.k = k
        self.epsilon = epsilon
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[Closed | None] = queue.Queue()
        self.emitted = 0
        self.held = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="summarizer", daemon=True)
        self._thread.start()

    def submit(self, closed: Closed) -> None:
        self._queue.put(closed)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
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
        """Turn a closed window into a sent or held summary, atomically with the sequence counter."""
        if c.window.count == 0 and not c.window.errors and c.window.confusion is None:
            return None
        key = f"held:{c.model}:{c.version}"
        # The wall clock stepped back while the window was open: its end is before its start, which no reader
        # accepts (and a held window like that would break every later merge). Keep the later clock's time.
        start = c.end if c.end < c.start else c.start  # one ISO format: text order is time order
        with self.sink.transaction() as tx:
            s = c.window.to_summary(self.device_id, c.model, c.version, 0, start, c.end)
            held_raw = tx.get_meta(key)
            if held_raw:
                s = merge(Summary.from_dict(json.loads(held_raw)), s)
            if s.count < self.k:
                tx.set_meta(key, json.dumps(s.to_dict()))
                self.held += 1
                return None
            if held_raw:
                tx.set_meta(key, "")
            seq = int(tx.get_meta("next_seq") or "1")
            s.seq = seq
            if self.epsilon > 0:
                s = add_laplace_noise(s, self.epsilon, self._rng)
                spent = float(tx.get_meta("epsilon_spent") or 0.0) + self.epsilon
                tx.set_meta("epsilon_spent", repr(spent))
            tx.put_summary(s)
            tx.set_meta("next_seq", str(seq + 1))
        self.emitted += 1
        return s

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
