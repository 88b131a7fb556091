"""Thread-safe ingest counters and their Prometheus text (``/metrics``)."""

from __future__ import annotations

import threading
from typing import Any

from .results import KINDS, REASONS, Outcome, Submission

__all__ = ["IngestCounters"]


class IngestCounters:
    """Thread-safe ingest counters and their Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = dict.fromkeys(KINDS, 0)  # summary envelopes (a refused message counts 1), reports, beats
        self.stored = 0  # summaries newly stored
        self.duplicates = 0  # summaries already stored (acknowledged, ignored)
        self.reports_stored = 0
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.dropped: dict[str, int] = {"rate_limited": 0}  # refused and not quarantined (see ratelimit)
        self.batches = 0
        self.write_errors = 0

    def add_received(self, kind: str, n: int) -> None:
        with self._lock:
            self.received[kind] = self.received.get(kind, 0) + n

    def add_committed(self, outcomes: list[tuple[Submission, Outcome]]) -> None:
        with self._lock:
            self.batches += 1
            for sub, out in outcomes:
                if sub.kind == "report":
                    self.reports_stored += out.accepted
                else:
                    self.stored += out.accepted
                    self.duplicates += out.duplicates
                for r in out.rejected:
                    self.rejected[r.reason] = self.rejected.get(r.reason, 0) + 1
                    if not r.kept:
                        self.dropped[r.reason] = self.dropped.get(r.reason, 0) + 1

    def add_write_error(self) -> None:
        with self._lock:
            self.write_errors += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"received": dict(self.received), "stored": self.stored, "duplicates": self.duplicates,
                    "reports_stored": self.reports_stored, "rejected": dict(self.rejected),
                    "dropped": dict(self.dropped),
                    "batches": self.batches, "write_errors": self.write_errors}

    def prometheus(self, queue_depth: int) -> str:
        c = self.snapshot()
        lines = [
            "# HELP edgefleet_ingest_received_total Documents received (summary envelopes, reports, heartbeats).",
            "# TYPE edgefleet_ingest_received_total counter",
            *(f'edgefleet_ingest_received_total{{kind="{k}"}} {v}' for k, v in c["received"].items()),
            "# HELP edgefleet_ingest_stored_total Summaries durably stored (committed).",
            "# TYPE edgefleet_ingest_stored_total counter",
            f"edgefleet_ingest_stored_total {c['stored']}",
            "# HELP edgefleet_ingest_duplicates_total Summaries already stored: acknowledged and ignored.",
            "# TYPE edgefleet_ingest_duplicates_total counter",
            f"edgefleet_ingest_duplicates_total {c['duplicates']}",
            "# HELP edgefleet_ingest_reports_stored_total Device reports that became the device's latest.",
            "# TYPE edgefleet_ingest_reports_stored_total counter",
            f"edgefleet_ingest_reports_stored_total {c['reports_stored']}",
            "# HELP edgefleet_ingest_rejected_total Documents refused, by reason (quarantined unless dropped).",
            "# TYPE edgefleet_ingest_rejected_total counter",
            *(f'edgefleet_ingest_rejected_total{{reason="{r}"}} {v}' for r, v in c["rejected"].items()),
            "# HELP edgefleet_ingest_dropped_total Refused documents not quarantined (over the device's "
            "quarantine allowance), by reason.",
            "# TYPE edgefleet_ingest_dropped_total counter",
            *(f'edgefleet_ingest_dropped_total{{reason="{r}"}} {v}' for r, v in c["dropped"].items()),
            "# HELP edgefleet_ingest_batches_total Write transactions committed.",
            "# TYPE edgefleet_ingest_batches_total counter",
            f"edgefleet_ingest_batches_total {c['batches']}",
            "# HELP edgefleet_ingest_write_errors_total Write transactions that failed after retries.",
            "# TYPE edgefleet_ingest_write_errors_total counter",
            f"edgefleet_ingest_write_errors_total {c['write_errors']}",
            "# HELP edgefleet_ingest_queue_depth Messages received and not yet committed.",
            "# TYPE edgefleet_ingest_queue_depth gauge",
            f"edgefleet_ingest_queue_depth {queue_depth}",
        ]
        return "\n".join(lines) + "\n"
