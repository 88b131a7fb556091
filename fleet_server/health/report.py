"""The health report (SQL + the pure signals): a model version fleet-wide, per cohort and per device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import NotFoundError, RequestError
from ..store import Store
from .aggregate import Aggregate, load_aggregate, time_range
from .policy import HealthPolicy
from .reference import Reference
from .signals import assess, compact


def _scope(agg: Aggregate, ids: list[str], policy: HealthPolicy) -> dict[str, Any]:
    vec, span = agg.total(ids)
    h = assess(agg.reference, agg.layout, vec, policy)
    return {"devices": len(ids), "window": {"start": span[0], "end": span[1]} if span else None, **h}


def _severity(h: dict[str, Any]) -> tuple[int, float]:
    feats = h["input_drift"]["features"]
    best = min((f["p_adjusted"] for f in feats if f["p_adjusted"] is not None), default=1.0)
    return (-len(h["input_drift"]["drifted_features"]), best)


def latest_version(store: Store, model: str) -> str:
    """The most recently published version. Raises NotFoundError listing the known models."""
    row = store.one("SELECT version FROM model_versions WHERE name = ? ORDER BY published DESC LIMIT 1", (model,))
    if row is None:
        known = [r["name"] for r in store.query("SELECT DISTINCT name FROM model_versions ORDER BY name")]
        raise NotFoundError(f"model {model!r} has no published version; known: {', '.join(known) or 'none'}")
    return str(row["version"])


def busiest_version(store: Store, model: str, since: str, until: str) -> tuple[str, int, int] | None:
    """The published version of ``model`` with the most stored summaries whose windows overlap ``[since, until)``
    (the newest received breaks a tie), its summaries and those of every version; None when there are none."""
    rows = store.query(
        "SELECT version, COUNT(*) AS n, MAX(received) AS last FROM summaries WHERE model = ? AND window_end > ?"
        " AND window_start < ? AND version IN (SELECT version FROM model_versions WHERE name = ?)"
        " GROUP BY version ORDER BY n DESC, last DESC", (model, since, until, model))
    if not rows:
        return None
    return str(rows[0]["version"]), int(rows[0]["n"]), sum(int(r["n"]) for r in rows)


def choose_version(store: Store, model: str, version: str | None, since: str, until: str) -> tuple[str, str]:
    """The version to report on and why: ``version`` when given, else the published version with the most
    summaries in ``[since, until)`` (the one the fleet runs, not a newer one published but not rolled out),
    else the newest published. The CLI, the API and the dashboard all choose this way."""
    if version:
        return version, "given"
    busiest = busiest_version(store, model, since, until)
    if busiest is None:
        return latest_version(store, model), "newest published (no summaries in the range)"
    chosen, n, total = busiest
    return chosen, f"most summaries in the range ({n} of {total})"


def report(store: Store, model: str, version: str | None = None, *, since: str | float | None = None,
           until: str | float | None = None, by: str | Sequence[str] | None = None,
           policy: HealthPolicy | None = None, devices: str = "compact", now: float | None = None) -> dict[str, Any]:
    """Health of ``model`` ``version`` fleet-wide, per value of tag ``by``, and per device (``devices``:
    ``compact`` | ``full`` | ``none``), worst first.

    ``version`` None: the published version with the most summaries in the range (the one the fleet runs, not a
    newer one published but not rolled out), else the newest published; ``version_chosen`` says which and why.

    ``by`` one tag key: ``by`` and ``cohorts`` (value -> health). Several keys (the dashboard asks for every
    key at once): ``by`` the list and ``cohorts_by`` (key -> value -> health), all from one read of the
    summaries instead of one per key.

    Raises NotFoundError (unknown model/version) or RequestError (bad time range or parameter)."""
    if devices not in ("compact", "full", "none"):
        raise RequestError(f"devices={devices!r} must be compact, full or none")
    policy = policy or HealthPolicy()
    a, b = time_range(since, until, now)
    version, chosen = choose_version(store, model, version, a, b)
    ref = Reference.load(store, model, version)
    agg = load_aggregate(store, ref, a, b)
    ids = sorted(agg.devices)
    out: dict[str, Any] = {
        "model": model, "version": version, "version_chosen": chosen, "since": a, "until": b,
        "reference_rows": ref.profile.n,
        "policy": policy.to_dict(), "skipped_summaries": agg.skipped,
        "fleet": _scope(agg, ids, policy),
    }
    keys = [by] if isinstance(by, str) else list(dict.fromkeys(by or []))
    keys = [k for k in keys if k]
    if len(keys) == 1:
        out["by"] = keys[0]
        out["cohorts"] = {value: _scope(agg, members, policy) for value, members in agg.cohorts(keys[0]).items()}
    elif keys:
        out["by"] = keys
        out["cohorts_by"] = {k: {value: _scope(agg, members, policy) for value, members in agg.cohorts(k).items()}
                             for k in keys}
    if devices != "none":
        per = []
        for d in ids:
            h = _scope(agg, [d], policy)
            entry = h if devices == "full" else {"window": h["window"], **compact(h)}
            per.append((_severity(h), {"device_id": d, "tags": agg.tags.get(d, {}), **entry}))
        per.sort(key=lambda t: (t[0], t[1]["device_id"]))
        out["devices"] = [e for _, e in per]
    return out
