"""What the dashboard shows, computed from the store: the fleet overview, a model version's four signals over
time, a feature's reference-vs-current histogram, and one device's history and recent windows.

Everything here reads; nothing writes. The signal values come from the same code the drift API and the
alerts use (:func:`fleet_server.health.assess` on summed summary vectors), so a chart never disagrees with a
page: a time bucket is simply a shorter time range.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np

from edgefleet_contracts.timeutil import parse

from .. import alerts, health
from ..devices import parse_tag as parse_device_tag
from ..errors import NotFoundError, RequestError
from ..rollouts import service as rollouts
from ..store import Store

MAX_BUCKETS = 96
TERMINAL_ROLLOUT = ("completed", "aborted", "rolled_back", "failed")


def _epoch(iso: str) -> float:
    return parse(iso, "time").timestamp()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_tag(tag: str | None) -> tuple[str, str] | None:
    """``key=value`` (a cohort filter) by the tag contract (:mod:`edgefleet_contracts.tags`), or None for no
    filter (no ``tag``, or ``tag=`` empty: the page's "all devices"). As everywhere, the split is at the first
    ``=`` and the value may be empty: ``site=`` is the cohort of devices whose site is ``""`` (this function
    refused it before the contract). Raises RequestError (422) naming the filter and what is wrong with it."""
    return parse_device_tag(tag) if tag else None


# ---- overview ---------------------------------------------------------------------------------------------

def overview(store: Store, now: float | None = None, offline_after_s: float = 300.0) -> dict[str, Any]:
    """Devices by tag value and by running version, online/offline by last seen, active alerts and rollouts.
    Revoked devices are no longer part of the fleet: only counted (``devices.revoked``)."""
    now = time.time() if now is None else now
    devices = []
    by_tag: dict[str, Counter[str]] = {}
    by_version: Counter[str] = Counter()
    online = 0
    for r in store.query("SELECT device_id, tags, last_seen, reported FROM devices WHERE revoked IS NULL"
                         " ORDER BY device_id"):
        tags = json.loads(r["tags"] or "{}")
        rep = json.loads(r["reported"]) if r["reported"] else {}
        active = rep.get("active") or None
        running = f"{active['name']} {active['version']}" if active else "no model"
        seen = r["last_seen"]
        is_online = seen is not None and now - float(seen) <= offline_after_s
        online += is_online
        by_version[running] += 1
        for k, v in tags.items():
            by_tag.setdefault(k, Counter())[v] += 1
        devices.append({"device_id": r["device_id"], "tags": tags, "last_seen": seen, "online": is_online,
                        "running": running, "update_state": rep.get("update_state"),
                        "last_result": rep.get("last_result")})
    active_alerts = alerts.list_alerts(store, "active", None, 50)
    active_rollouts = [r for r in rollouts.list_rollouts(store) if r["state"] not in TERMINAL_ROLLOUT]
    models = [{"name": r["name"], "owner": r["owner"],
               "versions": [v["version"] for v in store.query(
                   "SELECT version FROM model_versions WHERE name = ? ORDER BY published DESC", (r["name"],))]}
              for r in store.query("SELECT name, owner FROM models ORDER BY name")]
    return {
        "now": now, "offline_after_s": offline_after_s,
        "devices": {"total": len(devices), "online": online, "offline": len(devices) - online,
                    "revoked": int(store.query("SELECT COUNT(*) FROM devices WHERE revoked IS NOT NULL")[0][0]),
                    "by_tag": {k: dict(sorted(c.items())) for k, c in sorted(by_tag.items())},
                    "by_version": dict(sorted(by_version.items())), "list": devices},
        "alerts": {"open": sum(a["state"] == "open" for a in active_alerts),
                   "acknowledged": sum(a["state"] == "acknowledged" for a in active_alerts),
                   "list": active_alerts},
        "rollouts": active_rollouts, "models": models,
    }


# ---- a model version's signals over time --------------------------------------------------------------------

def _rows(store: Store, ref: health.Reference, layout: health.Layout, since: str, until: str,
          tag: tuple[str, str] | None) -> list[tuple[str, float, np.ndarray]]:
    """(device, window end as epoch, summary vector) of the version's summaries overlapping the range,
    restricted to devices carrying ``tag`` when given."""
    allowed: set[str] | None = None
    if tag is not None:
        allowed = {r["device_id"] for r in store.query("SELECT device_id, tags FROM devices")
                   if json.loads(r["tags"] or "{}").get(tag[0]) == tag[1]}
    return [(device_id, _epoch(end), vec)
            for device_id, _, end, vec in health.summary_vectors(store, ref, layout, since, until)
            if vec is not None and (allowed is None or device_id in allowed)]


def _point(h: dict[str, Any], layout: health.Layout, devices: int) -> dict[str, Any]:
    od = h["output_drift"]
    return {
        "count": h["count"], "devices": devices,
        "input": {f["feature"]: {"statistic": f["statistic"], "verdict": f["verdict"]}
                  for f in h["input_drift"]["features"]},
        "drifted_features": h["input_drift"]["drifted_features"],
        "class_share": od["class_mix"]["current_share"], "class_drift": od["class_mix"]["drifted"],
        "confidence_ks": od["confidence"]["ks"], "confidence_drift": od["confidence"]["drifted"],
        "latency_ms": h["operations"]["latency_ms"], "error_rate": h["operations"]["error_rate"],
        "accuracy_measured": (h["accuracy"]["measured"] or {}).get("accuracy"),
        "labels": (h["accuracy"]["measured"] or {}).get("labels", 0),
        "accuracy_estimated": h["accuracy"]["estimated"], "trustworthy": h["accuracy"]["trustworthy"],
    }


def signals(store: Store, model: str, version: str | None = None, *, since: str | None = None,
            until: str | None = None, buckets: int = 24, tag: str | None = None,
            policy: health.HealthPolicy | None = None, now: float | None = None) -> dict[str, Any]:
    """The four signals of one model version over ``buckets`` equal time buckets of ``[since, until)``
    (by window end), for the whole fleet or the devices carrying ``tag`` (``key=value``), plus the whole
    range's verdicts (features worst first). Raises NotFoundError / RequestError."""
    if not 1 <= buckets <= MAX_BUCKETS:
        raise RequestError(f"buckets={buckets} must be 1..{MAX_BUCKETS}")
    cohort = parse_tag(tag)
    a, b = health.time_range(since, until, now)
    version, chosen = health.choose_version(store, model, version, a, b)
    policy = policy or alerts.rules_for(store, model).health
    ref = health.Reference.load(store, model, version)
    layout = health.Layout(ref.profile)
    rows = _rows(store, ref, layout, a, b, cohort)
    t0, t1 = _epoch(a), _epoch(b)
    if rows and since is None:  # default range: start at the first data, so the buckets are not mostly empty
        # (rows are selected by window overlap, so the first end may lie at or past ``t1``: keep a range)
        t0 = min(max(t0, min(t for _, t, _ in rows) - 1.0), t1 - 1.0)
    width = (t1 - t0) / buckets
    sums = [np.zeros(layout.size) for _ in range(buckets)]
    members: list[set[str]] = [set() for _ in range(buckets)]
    total = np.zeros(layout.size)
    for device_id, t, vec in rows:
        i = min(max(int((t - t0) // width), 0), buckets - 1)
        sums[i] += vec
        members[i].add(device_id)
        total += vec
    series = []
    for i in range(buckets):
        start, end = t0 + i * width, t0 + (i + 1) * width
        point: dict[str, Any] = {"start": _iso(start), "end": _iso(end)}
        if layout.scalars(sums[i])[3]:
            point.update(_point(health.assess(ref, layout, sums[i], policy), layout, len(members[i])))
        else:
            point["count"] = 0
        series.append(point)
    whole = health.assess(ref, layout, total, policy)
    return {
        "model": model, "version": version, "version_chosen": chosen, "since": _iso(t0), "until": b, "tag": tag,
        "buckets": buckets,
        "features": layout.names, "classes": ref.profile.classes, "reference_rows": ref.profile.n,
        "devices": len({d for d, _, _ in rows}), "summaries": len(rows), "policy": policy.to_dict(),
        "overall": {"input_drift": whole["input_drift"], "output_drift": whole["output_drift"],
                    "operations": whole["operations"], "accuracy": whole["accuracy"],
                    "data_quality": {k: whole["data_quality"][k] for k in ("flagged", "issues", "requests",
                                                                            "schema_error_rate")},
                    "count": whole["count"]},
        "series": series,
        "tags": _tag_values(store),
    }


def _tag_values(store: Store) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for r in store.query("SELECT tags FROM devices"):
        for k, v in json.loads(r["tags"] or "{}").items():
            out.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in sorted(out.items())}


def histogram(store: Store, model: str, version: str, feature: str, *, since: str | None = None,
              until: str | None = None, tag: str | None = None, now: float | None = None) -> dict[str, Any]:
    """Reference vs current counts of one input feature on the profile's bins (first bin: below the first
    edge; last: at or above the last)."""
    cohort = parse_tag(tag)
    a, b = health.time_range(since, until, now)
    ref = health.Reference.load(store, model, version)
    layout = health.Layout(ref.profile)
    if feature not in layout.names:
        raise NotFoundError(f"{model} {version} has no input feature {feature!r}; features: "
                            f"{', '.join(layout.names)}")
    j = layout.names.index(feature)
    cur = np.zeros(layout.size)
    for _, _, vec in _rows(store, ref, layout, a, b, cohort):
        cur += vec
    size = layout.sizes[j]
    # Noised summaries (dp_epsilon) carry signed counts that are unbiased only in sum: a bar is never below zero.
    current = np.clip(np.rint(layout.feature_matrix_from(layout.part(cur, "bins"))[j, :size]), 0, None)
    reference = layout.reference[j, :size]
    return {"model": model, "version": version, "feature": feature, "tag": tag, "since": a, "until": b,
            "edges": list(ref.profile.features[j].edges), "reference": reference.astype(int).tolist(),
            "current": current.astype(int).tolist()}


# ---- one device -------------------------------------------------------------------------------------------

def device_history(store: Store, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """Changes of the device's reported state (install results, active version), newest first."""
    if store.one("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)) is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    rows = store.query("SELECT at, detail FROM events WHERE kind = 'device_state' AND subject = ?"
                       " ORDER BY id DESC LIMIT ?", (device_id, max(1, min(limit, 500))))
    return [{"received": _iso(r["at"]), **json.loads(r["detail"])} for r in rows]


def device_windows(store: Store, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The device's most recent stored windows: version, span, predictions, errors, latency p95."""
    if store.one("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)) is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    out = []
    for r in store.query("SELECT seq, model, version, window_start, window_end, count, body, received"
                         " FROM summaries WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
                         (device_id, max(1, min(limit, 500)))):
        body = json.loads(r["body"])
        ops = body.get("ops") or {}
        lat = np.asarray(ops.get("latency_counts") or [], dtype=np.float64)
        errors = {k: int(v) for k, v in (ops.get("errors") or {}).items() if v}
        out.append({"seq": r["seq"], "model": r["model"], "version": r["version"], "start": r["window_start"],
                    "end": r["window_end"], "count": r["count"], "errors": errors,
                    "p95_ms": health.latency_percentiles(lat)["p95"] if lat.size else None,
                    "received": _iso(r["received"])})
    return out
