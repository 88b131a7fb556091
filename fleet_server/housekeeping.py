"""Bounded storage: the housekeeping pass that keeps the quarantine and the summaries from growing without end.

**Quarantine.** Anyone who can publish to the broker or POST ``/api/v1/summaries`` can make quarantine rows, so
the table is capped, oldest first, two ways (``ServerSettings``; ``fleet-server serve`` flags):

- ``quarantine_max_rows`` (default 100,000) rows. A row without its payload is small (the detail is cut at 2,000
  characters), so this keeps the *shape* of an attack for a long time: when it started, from which source,
  which device ids it claimed, which checks failed and why. That is what an investigation needs first, and it
  needs it the longest.
- ``quarantine_max_payload_mb`` (default 256 MiB) of payloads (each at most 64 KiB, so at least the newest 4,096
  whole messages). Past this budget the oldest rows lose their payload and keep their metadata: the bytes of a
  forged or malformed message matter as samples, and a flood repeats itself, so the newest ones are enough. A
  row whose payload was evicted lists ``payload_bytes`` 0 and an empty preview. 0 keeps no payloads at all.

Worst case the quarantine then holds 256 MiB of payloads plus ~220 MB of metadata (100,000 rows of ~2.2 KB).

**Summaries.** Rows are deleted ``summary_retention_days`` (default 400; 0 = forever) after they were
*received* (the server's clock: a device's window times are its own). Evaluation reads only recent windows, so
older rows only cost disk; 400 days covers the longest stage the rollout API accepts (365 days of bake) and a
year of history on the dashboard. A retention under one day, the longest window the server reads by default,
is refused at start-up (``settings.MIN_SUMMARY_RETENTION_DAYS``). Windows set at run time are protected by the
pass itself: it never deletes a row received since the oldest active rollout's stage started (its gates read
them), nor one that any model's alert window (``window_s``) still covers (allowing for the 5-minute clock skew
ingest accepts); when that holds pruning back, the cutoff it used is in ``/metrics``.

**The pass.** Quarantine rows over the cap are deleted oldest first; then, while payloads are over the budget,
the oldest payloads are set to NULL; then summaries older than the cutoff are deleted, per model version through
the ``summaries_model`` index. Each step deletes at most ``housekeeping_chunk_rows`` (default 500) rows, and
frees at most 4 MiB of quarantine payloads, in its own short ``BEGIN IMMEDIATE`` transaction (``Store.write``;
5-45 ms measured on a 2-core machine), then pauses at least as long as that transaction held the write lock, so
the ingest writer, which commits a batch before acknowledging it, gets its turn within one chunk's time. Nothing
is deleted per insert: migration 4 keeps the quarantine's row count and payload bytes in ``quarantine_usage``
(triggers: one single-row UPDATE per quarantine insert, ~15% on bare quarantine inserts, nothing on summaries),
so checking the caps is one read of one row.

:class:`HousekeepingService` runs a full pass every ``housekeeping_interval_seconds`` (default 60), and checks the
quarantine caps every second in between, running the quarantine steps at once when a flood has pushed it over,
so the overshoot stays about one second of flood. A pass's summary pruning checks them every second too, between
its chunks, so a long prune (many old rows) does not leave the quarantine unchecked meanwhile. A failing pass is
logged and counted and the next one runs as usual; ``stop`` interrupts a pass between chunks. ``fleet-server
housekeeping --data DIR`` runs one pass (cron, or before a backup). The file does not shrink when rows go (SQLite
reuses the freed pages): it stays at its high-water mark, which these bounds cap; ``VACUUM`` with the server stopped
gives the space back.

Metrics (``/metrics``): ``edgefleet_quarantine_evicted_total{part="row"|"payload"}`` (rising = you are under a
flood), ``edgefleet_quarantine_evicted_bytes_total``, gauges ``edgefleet_quarantine_rows`` and
``edgefleet_quarantine_payload_bytes``, ``edgefleet_summaries_pruned_total``,
``edgefleet_summaries_retention_cutoff_timestamp_seconds`` and ``edgefleet_housekeeping_{passes,failures,
transactions}_total``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .alerts import AlertRules, parse_rules
from .errors import FleetError
from .health import fmt_epoch
from .ingest.results import FUTURE_SKEW
from .rollouts.engine import TERMINAL
from .settings import ServerSettings
from .store import Store

__all__ = ["HousekeepingService", "PassResult", "attach_housekeeping", "fits", "payloads_to_evict", "summaries_cutoff"]

log = logging.getLogger("edgefleet.housekeeping")

CHUNK_BYTES = 4 * 1024 * 1024  # a quarantine chunk also frees at most this much payload (about 64 full rows)
MIN_PAUSE_S = 0.005  # between two chunks, at least (and at least as long as the last chunk held the lock)
QUARANTINE_CHECK_S = 1.0  # how often the service checks the quarantine caps between full passes


# ---- the pure core ------------------------------------------------------------------------------------------
def payloads_to_evict(sizes: Sequence[int], excess: int) -> int:
    """How many of the oldest payloads (``sizes``, oldest first) to evict to free at least ``excess`` bytes:
    all of them when they do not add up to it (the next chunk continues)."""
    freed = 0
    for i, n in enumerate(sizes):
        if freed >= excess:
            return i
        freed += n
    return len(sizes)


def fits(sizes: Sequence[int], budget: int) -> int:
    """How many of the leading ``sizes`` add up to no more than ``budget`` (at least one, so a chunk always
    makes progress)."""
    total = 0
    for i, n in enumerate(sizes):
        total += n
        if total > budget:
            return max(i, 1)
    return len(sizes)


def summaries_cutoff(now: float, retention_s: float, *, alert_window_s: float,
                     rollout_since: float | None) -> float | None:
    """Summaries received before the returned time may be deleted; None keeps them all (retention 0).

    Never later than what is still read: the longest alert window back from ``now`` (less the clock skew ingest
    accepts in a window's end), and the start of the oldest active rollout stage (its gates read every summary
    received since)."""
    if retention_s <= 0:
        return None
    cutoff = min(now - retention_s, now - alert_window_s - FUTURE_SKEW.total_seconds())
    return cutoff if rollout_since is None else min(cutoff, rollout_since)


# ---- one pass -----------------------------------------------------------------------------------------------
@dataclass
class PassResult:
    """What one pass did."""

    quarantine_rows_evicted: int = 0
    quarantine_payloads_evicted: int = 0
    quarantine_bytes_freed: int = 0
    summaries_pruned: int = 0
    summaries_cutoff: float | None = None  # None: summaries kept forever (or not looked at in this pass)
    transactions: int = 0  # write transactions that deleted something
    complete: bool = True  # False when stopped between chunks

    def add(self, other: PassResult) -> None:
        for f in fields(self):
            if f.name in ("summaries_cutoff", "complete"):
                continue
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class HousekeepingService:
    """Enforces the storage bounds of ``settings`` on ``store``. ``run_once`` is one synchronous pass (the CLI,
    tests); ``start``/``stop`` run passes on a thread (idempotent).

    ``pause_seconds`` fixes the pause between chunks (default: adaptive, see the module docstring);
    ``check_seconds`` how often the thread checks the quarantine caps between full passes. ``clock`` (epoch
    seconds, default ``time.time``) is the service's only wall-clock time: summary retention and the alert and
    rollout windows are judged against it, in ``run_once`` and on the thread alike (a test injects one;
    ``run_once`` takes no time of its own). Pauses and the interval between passes are measured on
    ``time.monotonic``, so a wall clock set back or forward cannot stretch them."""

    def __init__(self, settings: ServerSettings, store: Store, *, pause_seconds: float | None = None,
                 check_seconds: float = QUARANTINE_CHECK_S, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.chunk = settings.housekeeping_chunk_rows
        self.interval = settings.housekeeping_interval_seconds
        self.pause_seconds = pause_seconds
        self.check_seconds = min(check_seconds, self.interval)
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.totals = PassResult()
        self.passes = 0
        self.failures = 0
        self.last_cutoff: float | None = None
        self._held_by = ""  # what held summary pruning back on the last pass (logged when it changes)
        self._next_check = 0.0  # monotonic: when a summary prune next checks the quarantine caps between chunks

    # ---- the pass -----------------------------------------------------------------------------------------
    def run_once(self, *, summaries: bool = True) -> PassResult:
        """One pass at ``clock()``: the quarantine caps, then (unless ``summaries`` is False) summary retention.
        Raises sqlite3 errors (the service counts them); what earlier chunks deleted stays deleted."""
        result = PassResult()
        try:
            self._evict_quarantine(result)
            if summaries and not self._stop.is_set():
                self._prune_summaries(result, self.clock())
        finally:
            result.complete = not self._stop.is_set()
            with self._lock:
                self.passes += 1
                self.totals.add(result)
                if result.summaries_cutoff is not None:
                    self.last_cutoff = result.summaries_cutoff
        if result.transactions:
            log.info("housekeeping: evicted %d quarantine rows and %d payloads (%d bytes), pruned %d summaries, "
                     "in %d transactions", result.quarantine_rows_evicted, result.quarantine_payloads_evicted,
                     result.quarantine_bytes_freed, result.summaries_pruned, result.transactions)
        return result

    def quarantine_usage(self) -> tuple[int, int]:
        """(rows, payload bytes) in the quarantine now (one row read, kept by the migration-4 triggers)."""
        row = self.store.one("SELECT row_count, payload_bytes FROM quarantine_usage WHERE id = 0")
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def quarantine_over(self) -> bool:
        rows, payload = self.quarantine_usage()
        return rows > self.settings.quarantine_max_rows or payload > self.settings.quarantine_max_payload_bytes

    def _pause(self, held: float) -> None:
        """Between two chunks: at least as long as the last one held the write lock (``pause_seconds`` if set),
        so a waiting ingest writer gets the lock; returns at once when stopping."""
        self._stop.wait(self.pause_seconds if self.pause_seconds is not None else max(MIN_PAUSE_S, held))

    def _evict_quarantine(self, result: PassResult) -> None:
        if not self.quarantine_over():  # a read: no write transaction when there is nothing to do
            return
        max_rows, max_bytes = self.settings.quarantine_max_rows, self.settings.quarantine_max_payload_bytes

        def chunk(c: sqlite3.Connection) -> bool:
            """Evict up to one chunk; whether the quarantine is still over a cap."""
            rows, payload, floor = _usage(c)
            if rows > max_rows:
                oldest = c.execute("SELECT id, COALESCE(length(payload), 0) FROM quarantine ORDER BY id LIMIT ?",
                                   (min(self.chunk, rows - max_rows),)).fetchall()
                last = int(oldest[fits([int(s[1]) for s in oldest], CHUNK_BYTES) - 1][0])
                result.quarantine_rows_evicted += c.execute("DELETE FROM quarantine WHERE id <= ?", (last,)).rowcount
            elif payload > max_bytes:
                sizes = c.execute("SELECT id, length(payload) FROM quarantine WHERE id >= ? AND payload IS NOT NULL"
                                  " ORDER BY id LIMIT ?", (floor, self.chunk)).fetchall()
                k = payloads_to_evict([int(s[1]) for s in sizes], payload - max_bytes)
                if k == 0:  # the usage row disagrees with the table (only a hand edit can do that)
                    raise RuntimeError(f"quarantine_usage counts {payload} payload bytes from id {floor} on, but "
                                       "no payload is left there; recount it (see fleet_server/store.py migration 4)")
                k = fits([int(s[1]) for s in sizes[:k]], CHUNK_BYTES)
                last = int(sizes[k - 1][0])
                c.execute("UPDATE quarantine SET payload = NULL WHERE id >= ? AND id <= ? AND payload IS NOT NULL",
                          (floor, last))
                c.execute("UPDATE quarantine_usage SET payload_floor = ? WHERE id = 0", (last + 1,))
                result.quarantine_payloads_evicted += k
            else:
                return False
            rows_after, payload_after, _ = _usage(c)
            result.quarantine_bytes_freed += payload - payload_after
            return rows_after > max_rows or payload_after > max_bytes

        while not self._stop.is_set():
            before = result.quarantine_rows_evicted + result.quarantine_payloads_evicted
            t0 = time.monotonic()
            with self.store.write() as c:
                more = chunk(c)
            if result.quarantine_rows_evicted + result.quarantine_payloads_evicted > before:
                result.transactions += 1
            if not more:
                return
            self._pause(time.monotonic() - t0)

    def _needs(self) -> tuple[float, str, float | None, str]:
        """(longest alert window in seconds, whose), (start of the oldest active rollout stage, whose)."""
        window, window_of = AlertRules().window_s, "the default alert window"
        for m in self.store.query("SELECT name, alert_rules FROM models"):
            try:
                w = parse_rules(json.loads(m["alert_rules"] or "{}"), strict=False).window_s
            except (ValueError, FleetError):
                continue  # evaluation cannot use these rules either
            if w > window:
                window, window_of = w, f"model {m['name']}'s alert window"
        marks = ",".join("?" * len(TERMINAL))
        row = self.store.one(f"SELECT id, stage_started FROM rollouts WHERE state NOT IN ({marks})"
                             " ORDER BY stage_started LIMIT 1", tuple(TERMINAL))
        if row is None:
            return window, window_of, None, ""
        return window, window_of, float(row["stage_started"]), f"rollout {row['id']}'s current stage"

    def _versions(self) -> list[tuple[str, str]]:
        """Every (model, version) with stored summaries: a skip-scan of the ``summaries_model`` index (one
        seek per version, not a scan of the rows)."""
        out: list[tuple[str, str]] = []
        row = self.store.one("SELECT model, version FROM summaries ORDER BY model, version LIMIT 1")
        while row is not None:
            out.append((row[0], row[1]))
            row = self.store.one("SELECT model, version FROM summaries WHERE (model, version) > (?, ?)"
                                 " ORDER BY model, version LIMIT 1", (row[0], row[1]))
        return out

    def _prune_summaries(self, result: PassResult, now: float) -> None:
        retention = self.settings.summary_retention_seconds
        if retention <= 0:
            return
        window, window_of, since, since_of = self._needs()
        cutoff = summaries_cutoff(now, retention, alert_window_s=window, rollout_since=since)
        if cutoff is None:
            return
        result.summaries_cutoff = cutoff
        held_by = ""
        if cutoff < now - retention:
            held_by = since_of if since is not None and cutoff == since else window_of
        if held_by != self._held_by:
            if held_by:
                log.warning("summary retention (%g days) held back: %s reads summaries received since %s",
                            self.settings.summary_retention_days, held_by,
                            fmt_epoch(cutoff))
            self._held_by = held_by
        self._next_check = time.monotonic() + self.check_seconds
        for model, version in self._versions():
            while not self._stop.is_set():
                # Chosen by a read (no lock, through the index); the write transaction only deletes them by
                # rowid, checking the time again.
                ids = [r[0] for r in self.store.query(
                    "SELECT rowid FROM summaries WHERE model = ? AND version = ? AND received < ? LIMIT ?",
                    (model, version, cutoff, self.chunk))]
                if not ids:
                    break
                t0 = time.monotonic()
                with self.store.write() as c:
                    result.summaries_pruned += c.execute(
                        f"DELETE FROM summaries WHERE rowid IN ({','.join('?' * len(ids))}) AND received < ?",
                        (*ids, cutoff)).rowcount
                result.transactions += 1
                if len(ids) < self.chunk:
                    break
                self._pause(time.monotonic() - t0)
                self._quarantine_between(result)

    def _quarantine_between(self, result: PassResult) -> None:
        """Between two summary chunks: the quarantine caps, checked every ``check_seconds`` as between passes. A
        long prune (a year of summaries after retention was shortened) takes many seconds; a flood must not grow
        the quarantine past its caps meanwhile."""
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.check_seconds
        if not self._stop.is_set():
            self._evict_quarantine(result)  # reads the usage row first: no write when under the caps

    # ---- the thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread, interrupting a pass (this one's or a ``run_once`` on another thread) between chunks;
        whether it ended within ``timeout``. Until the next ``start``, ``run_once`` does nothing."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.error("housekeeping did not stop within %.1f s", timeout)
            return False
        return True

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_full = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_full:
                    next_full = time.monotonic() + self.interval
                    self.run_once()
                elif self.quarantine_over():
                    self.run_once(summaries=False)
            except Exception:  # noqa: BLE001 — a failed pass is logged and counted; the next one runs as usual
                with self._lock:
                    self.failures += 1
                log.exception("housekeeping pass failed")
            self._stop.wait(self.check_seconds)

    # ---- metrics ------------------------------------------------------------------------------------------
    def metrics(self) -> str:
        rows, payload = self.quarantine_usage()
        with self._lock:
            t, passes, failures, cutoff = self.totals, self.passes, self.failures, self.last_cutoff
            lines = [
                "# HELP edgefleet_quarantine_evicted_total Quarantine rows deleted (part=row) and payloads dropped "
                "with the row kept (part=payload) to stay within the caps; rising means a flood of rejects.",
                "# TYPE edgefleet_quarantine_evicted_total counter",
                f'edgefleet_quarantine_evicted_total{{part="row"}} {t.quarantine_rows_evicted}',
                f'edgefleet_quarantine_evicted_total{{part="payload"}} {t.quarantine_payloads_evicted}',
                "# HELP edgefleet_quarantine_evicted_bytes_total Quarantine payload bytes freed by eviction.",
                "# TYPE edgefleet_quarantine_evicted_bytes_total counter",
                f"edgefleet_quarantine_evicted_bytes_total {t.quarantine_bytes_freed}",
                "# HELP edgefleet_quarantine_rows Quarantine rows stored.",
                "# TYPE edgefleet_quarantine_rows gauge",
                f"edgefleet_quarantine_rows {rows}",
                "# HELP edgefleet_quarantine_payload_bytes Quarantine payload bytes stored.",
                "# TYPE edgefleet_quarantine_payload_bytes gauge",
                f"edgefleet_quarantine_payload_bytes {payload}",
                "# HELP edgefleet_summaries_pruned_total Summaries deleted past the retention period.",
                "# TYPE edgefleet_summaries_pruned_total counter",
                f"edgefleet_summaries_pruned_total {t.summaries_pruned}",
                "# HELP edgefleet_summaries_retention_cutoff_timestamp_seconds Summaries received before this time "
                "are pruned (earlier than now minus the retention while a rollout or alert window needs them).",
                "# TYPE edgefleet_summaries_retention_cutoff_timestamp_seconds gauge",
                *([f"edgefleet_summaries_retention_cutoff_timestamp_seconds {cutoff:.3f}"] if cutoff is not None
                  else []),
                "# HELP edgefleet_housekeeping_passes_total Housekeeping passes run (failed ones too).",
                "# TYPE edgefleet_housekeeping_passes_total counter",
                f"edgefleet_housekeeping_passes_total {passes}",
                "# HELP edgefleet_housekeeping_failures_total Housekeeping passes that raised.",
                "# TYPE edgefleet_housekeeping_failures_total counter",
                f"edgefleet_housekeeping_failures_total {failures}",
                "# HELP edgefleet_housekeeping_transactions_total Write transactions housekeeping committed.",
                "# TYPE edgefleet_housekeeping_transactions_total counter",
                f"edgefleet_housekeeping_transactions_total {t.transactions}",
            ]
        return "\n".join(lines) + "\n"


def _usage(c: sqlite3.Connection) -> tuple[int, int, int]:
    row = c.execute("SELECT row_count, payload_bytes, payload_floor FROM quarantine_usage WHERE id = 0").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def attach_housekeeping(app: Any, ctx: Any, **options: Any) -> HousekeepingService:
    """Create the :class:`HousekeepingService`, keep it in ``ctx.extensions["housekeeping"]``, add its metrics,
    and start/stop it with the app (startup/shutdown handlers)."""
    from .app import with_app

    svc = HousekeepingService(ctx.settings, ctx.store, **options)
    ctx.extensions["housekeeping"] = svc
    ctx.metrics.append(svc.metrics)
    with_app(app, svc.start, svc.stop)
    return svc
