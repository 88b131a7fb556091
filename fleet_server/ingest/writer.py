"""The durable writer: one thread, group commits of validated submissions, quarantine rows, then callbacks.

See the package docstring for the guarantees (ack only after commit, idempotent on ``(device_id, seq)``).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.timeutil import parse

from ..settings import ServerSettings
from ..store import Store
from .counters import IngestCounters
from .results import QUARANTINE_PAYLOAD_BYTES, Outcome, Rejection, ReportUpdate, Submission

__all__ = ["IngestWriter"]

log = logging.getLogger(__name__)

_INSERT_SUMMARY = ("INSERT OR IGNORE INTO summaries (device_id, seq, model, version, window_start, window_end, count,"
                   " body, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_QUARANTINE = ("INSERT INTO quarantine (received, source, device_id, reason, detail, payload)"
                      " VALUES (?, ?, ?, ?, ?, ?)")
_MAX_DETAIL = 2000


class IngestWriter:
    """One thread that commits submissions in batches and then runs their ``done`` callbacks.

    A transaction holds up to ``settings.ingest_batch`` rows (summaries, quarantine rows, reports); a single
    submission is never split. A failing transaction is retried ``retries`` times with backoff; if it still
    fails, each HTTP submission's callback gets ``Outcome(error=...)`` (the client is answered 503 and sends
    again), while the MQTT submissions are kept and retried (backoff up to ``MAX_BACKOFF_S``) until they commit
    or the writer stops: their acknowledgement is withheld meanwhile. Giving them up instead relied on the broker
    delivering them again after a reconnect, which Mosquitto does and the embedded amqtt broker does not (an
    audit lost 5,963 summaries on a disk that filled and emptied again, with no crash). ``failing_since``
    says since when commits fail (None while they succeed), for ``/healthz``.
    """

    MAX_BACKOFF_S = 5.0

    def __init__(self, settings: ServerSettings, store: Store, *, counters: IngestCounters | None = None,
                 retries: int = 3) -> None:
        self.settings = settings
        self.store = store
        self.counters = counters or IngestCounters()
        self.retries = retries
        self._queue: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0  # submitted, callback not yet run
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.failing_since: float | None = None  # wall time of the first failed commit of the current run
        self._retrying = False  # a batch of MQTT messages waits for the store (HTTP ones are answered at once)
        self.last_write_error: str | None = None

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._accepting = True
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
            self._thread.start()

    def submit(self, sub: Submission) -> None:
        """Queue a submission (never blocks). After ``stop()`` its callback gets an error at once, and so does an
        HTTP submission while a batch of MQTT messages waits for the store (the client is answered 503 at once
        and sends again; queued, it would wait behind that batch and hold its body in memory meanwhile)."""
        failing = self._retrying and sub.source != "mqtt"
        with self._cond:
            accepting = self._accepting and not failing
            if accepting:
                self._pending += 1
                n = len(sub.summaries) + len(sub.rejections) if sub.kind == "summary" else 1
                self.counters.add_received(sub.kind, n)
                self._queue.put(sub)  # under the lock: stop() cannot queue its end marker before it
                return
        error = (f"the store is failing ({self.last_write_error}); nothing was stored, send again later" if failing
                 else "ingest writer is stopped")
        self._finish(sub, Outcome(rejected=[], error=error))

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until every submitted callback ran; returns whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Commit what is queued (bounded by ``timeout``), then end the thread. Returns whether it ended."""
        with self._cond:
            thread, self._accepting = self._thread, False
        if thread is None:
            return True
        self._stopping.set()  # a batch being retried gives up: its MQTT messages stay unacknowledged
        with self._cond:
            self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            log.error("ingest writer did not finish within %.1f s; %d messages not committed", timeout, self.pending)
            return False
        with self._cond:
            self._thread = None
        return True

    # ---- thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        carry: Submission | None = None  # taken from the queue but over the previous batch's row limit
        while not stopping or carry is not None:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                break
            batch, rows = [first], first.rows
            while rows < self.settings.ingest_batch and not stopping:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                elif rows + nxt.rows > self.settings.ingest_batch:
                    carry = nxt
                    break
                else:
                    batch.append(nxt)
                    rows += nxt.rows
            self._commit(batch)

    def _commit(self, batch: list[Submission]) -> None:
        """Commit ``batch`` and run its callbacks. The store's own failures (``sqlite3.DatabaseError`` such as a
        full disk or an I/O error) are retried (``_store_failed``); a value SQLite cannot bind or store (an int
        past 64 bits, ``DataError``, ``ProgrammingError``) comes from what a submission holds, so the batch is
        committed one submission at a time and the one the store refuses is quarantined as ``internal`` and
        acknowledged, never retried for ever (one bad message held every other one back)."""
        attempt = 0
        while batch:
            try:
                outcomes = self._write(batch)
            except (sqlite3.DataError, sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:
                content: Exception | None = exc  # a value SQLite cannot bind or store
            except sqlite3.DatabaseError as exc:  # the store's trouble: full disk, I/O, locked, a trigger refusing
                attempt += 1
                batch = self._store_failed(batch, exc, attempt)
                continue
            except Exception as exc:  # noqa: BLE001 - OverflowError (an int past 64 bits) and the like: content
                content = exc
            else:
                content = None
            if content is not None:
                if len(batch) > 1:
                    for sub in batch:
                        self._commit([sub])
                    return
                sub = batch[0]
                if sub.summaries or sub.report is not None:
                    log.error("ingest: the store refused a %s message (%r); quarantined as internal", sub.source,
                              content)
                    batch = [_quarantined(sub, content)]
                    continue
                self._done([(sub, Outcome(error=f"store write failed: {content!r}"))])  # not even its rejection
                return
            if attempt:
                log.warning("ingest commits work again after %d failed attempt(s)", attempt)
            self.failing_since = self.last_write_error = None
            self._retrying = False
            self.counters.add_committed(list(zip(batch, outcomes, strict=True)))
            self._done(list(zip(batch, outcomes, strict=True)))
            return

    def _store_failed(self, batch: list[Submission], exc: Exception, attempt: int) -> list[Submission]:
        """After the store failed ``attempt`` times in a row on ``batch``: the submissions to try again (after a
        pause). Past ``retries`` the HTTP ones are answered with the error (the client sends again) and the MQTT
        ones kept, their acknowledgement withheld, until the store takes them or the writer stops."""
        error = f"store write failed: {exc!r}"
        if self.failing_since is None:
            self.failing_since = time.time()
        self.last_write_error = error
        if attempt == 1 or attempt % 20 == 0:
            log.warning("ingest batch of %d messages failed (attempt %d): %s", len(batch), attempt, exc)
        if attempt <= self.retries:
            self._stopping.wait(min(1.0, 0.05 * 2 ** (attempt - 1)))  # stop() ends the pause
            return batch
        self.counters.add_write_error()
        keep = [] if self._stopping.is_set() else [s for s in batch if s.source == "mqtt"]
        kept = {id(s) for s in keep}
        self._done([(s, Outcome(error=error)) for s in batch if id(s) not in kept])
        self._retrying = bool(keep)
        if keep:
            self._stopping.wait(min(self.MAX_BACKOFF_S, 0.05 * 2 ** min(attempt, 10)))
        return keep

    def _done(self, results: list[tuple[Submission, Outcome]]) -> None:
        for sub, out in results:
            self._finish(sub, out)
            with self._cond:
                self._pending -= 1
                if not self._pending:
                    self._cond.notify_all()

    @staticmethod
    def _finish(sub: Submission, out: Outcome) -> None:
        if sub.done is None:
            return
        try:
            sub.done(out)
        except Exception:
            log.exception("an ingest completion callback failed")

    def _write(self, batch: list[Submission]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        seen: dict[str, float] = {}
        with self.store.write() as c:
            for sub in batch:
                out = Outcome(rejected=list(sub.rejections))
                if sub.summaries:
                    if any(a.span is not None for a in sub.summaries):
                        raise RuntimeError("a submission reached the writer unresolved (Submission.resolve)")
                    cur = c.executemany(_INSERT_SUMMARY, [
                        (a.device_id, a.seq, a.model, a.version, a.start, a.end, a.count, a.body, sub.received)
                        for a in sub.summaries])
                    out.accepted = max(cur.rowcount, 0)
                    out.duplicates = len(sub.summaries) - out.accepted
                if sub.rejections:
                    c.executemany(_INSERT_QUARANTINE, [
                        (sub.received, sub.source, r.device_id, r.reason, r.detail[:_MAX_DETAIL],
                         r.payload[:QUARANTINE_PAYLOAD_BYTES]) for r in sub.rejections if r.kept])
                if sub.report is not None:
                    if self._store_report(c, sub.report):
                        out.accepted = 1
                    else:
                        out.duplicates = 1
                for d in sub.seen:
                    seen[d] = max(seen.get(d, 0.0), sub.received)
                outcomes.append(out)
            if seen:
                c.executemany("UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE device_id = ?",
                              [(t, d) for d, t in seen.items()])
        return outcomes

    @staticmethod
    def _store_report(c: Any, report: ReportUpdate) -> bool:
        row = c.execute("SELECT reported FROM devices WHERE device_id = ?", (report.device_id,)).fetchone()
        if row is None:
            return False
        if row["reported"]:
            try:
                current: datetime | None = parse(json.loads(row["reported"]).get("at"), "reported.at")
            except (ValueError, AttributeError, SchemaError):
                current = None  # unreadable: replace it
            # Strictly older only: reports carry second-resolution times, and several state changes often fall in
            # one second; MQTT keeps one device's messages on one topic in order, so the later arrival is newer.
            if current is not None and report.at < current:
                return False
        c.execute("UPDATE devices SET reported = ? WHERE device_id = ?", (report.document, report.device_id))
        return True


def _quarantined(sub: Submission, exc: Exception) -> Submission:
    """``sub`` with nothing stored but a quarantine row saying the store refused it (its first body kept as
    the payload): committed and acknowledged like any rejection, so the broker does not deliver it again."""
    device = sub.summaries[0].device_id if sub.summaries else (sub.report.device_id if sub.report else None)
    payload = sub.summaries[0].body.encode() if sub.summaries and sub.summaries[0].body else b""
    refused = Rejection(None, "internal", f"the store refused it: {exc!r}", device, payload)
    return replace(sub, summaries=[], report=None, rejections=[*sub.rejections, refused], seen=())
