"""Aggregation (SQL): the stored summaries of a model version in a time range, summed per device.

Summaries are counts on the reference profile's bins, so aggregation is addition: every stored summary becomes
one :class:`~fleet_server.health.reference.Layout` vector, vectors add per device (:func:`load_aggregate`),
and :meth:`Aggregate.total` adds device totals for a cohort tag value (``devices.tags``) or the whole fleet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgefleet_contracts.timeutil import fmt, parse, parse_duration

from ..errors import RequestError
from ..store import Store
from .reference import Layout, Reference

DEFAULT_LOOKBACK_S = 86400.0
UNTAGGED = "(none)"


@dataclass
class Aggregate:
    """Summed summary vectors of one model version in a time range, per device."""

    reference: Reference
    layout: Layout
    since: str
    until: str
    devices: dict[str, np.ndarray]
    spans: dict[str, tuple[str, str]]  # device -> (first window start, last window end)
    tags: dict[str, dict[str, str]]  # device -> tags (empty for devices not enrolled)
    skipped: int = 0  # stored summaries whose bins do not match the profile (not counted)

    def total(self, device_ids: list[str]) -> tuple[np.ndarray, tuple[str, str] | None]:
        vec = np.zeros(self.layout.size)
        starts, ends = [], []
        for d in device_ids:
            vec += self.devices[d]
            starts.append(self.spans[d][0])
            ends.append(self.spans[d][1])
        return vec, ((min(starts), max(ends)) if starts else None)

    def cohorts(self, tag: str) -> dict[str, list[str]]:
        """Tag value -> devices (devices without the tag under ``(none)``)."""
        out: dict[str, list[str]] = {}
        for d in sorted(self.devices):
            out.setdefault(self.tags.get(d, {}).get(tag, UNTAGGED), []).append(d)
        return out

    def tag_keys(self) -> list[str]:
        return sorted({k for d in self.devices for k in self.tags.get(d, {})})


def time_range(since: str | float | None, until: str | float | None, now: float | None = None) -> tuple[str, str]:
    """``since``/``until`` as ISO 8601 UTC, a duration back from now ('24h', '30m', '7d') or epoch seconds.

    Raises RequestError naming the bad value."""
    now = time.time() if now is None else now

    def one(v: str | float | None, default: float, what: str) -> str:
        if v is None or v == "":
            return fmt_epoch(default)
        if isinstance(v, int | float):
            return fmt_epoch(float(v))
        try:
            if v[-1:] in ("d", "h", "m", "s") and v[:-1].isdigit():
                return fmt_epoch(now - parse_duration(v).total_seconds())
            return fmt(parse(v, what))
        except Exception:  # noqa: BLE001 — any parse failure is the caller's bad parameter
            raise RequestError(f"{what}={v!r} must be an ISO 8601 UTC time (2026-01-01T00:00:00Z) or a duration "
                               "back from now (24h, 30m, 7d)") from None

    a, b = one(since, now - DEFAULT_LOOKBACK_S, "since"), one(until, now + 1, "until")
    if b <= a:
        raise RequestError(f"until ({b}) must be after since ({a})")
    return a, b


def fmt_epoch(t: float) -> str:
    from datetime import UTC, datetime

    return fmt(datetime.fromtimestamp(t, UTC))


def summary_vectors(store: Store, reference: Reference, layout: Layout, since: str, until: str
                    ) -> Iterator[tuple[str, str, str, np.ndarray | None]]:
    """(device, window start, window end, summary vector — None when its bins do not match the profile) of
    each stored summary of ``reference``'s version whose window overlaps ``[since, until)``.

    Window times are compared as the canonical ``YYYY-MM-DDTHH:MM:SSZ`` strings ingest stores."""
    rows = store.conn().execute(
        "SELECT device_id, window_start, window_end, body FROM summaries WHERE model = ? AND version = ?"
        " AND window_end > ? AND window_start < ?", (reference.model, reference.version, since, until))
    for device_id, start, end, body in rows:
        yield device_id, start, end, layout.row(json.loads(body))


def load_aggregate(store: Store, reference: Reference, since: str, until: str) -> Aggregate:
    """Sum the stored summaries of ``reference``'s version whose windows overlap ``[since, until)``."""
    layout = Layout(reference.profile)
    devices: dict[str, np.ndarray] = {}
    spans: dict[str, tuple[str, str]] = {}
    skipped = 0
    for device_id, start, end, vec in summary_vectors(store, reference, layout, since, until):
        if vec is None:
            skipped += 1
            continue
        acc = devices.get(device_id)
        if acc is None:
            devices[device_id] = vec
            spans[device_id] = (start, end)
        else:
            acc += vec
            s0, e0 = spans[device_id]
            spans[device_id] = (min(s0, start), max(e0, end))
    tags: dict[str, dict[str, str]] = {}
    if devices:
        for r in store.query("SELECT device_id, tags FROM devices"):
            if r["device_id"] in devices:
                tags[r["device_id"]] = json.loads(r["tags"] or "{}")
    return Aggregate(reference, layout, since, until, devices, spans, tags, skipped)
