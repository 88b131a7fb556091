"""The four monitoring signals of one summed vector, pure (plain data in, plain data out): :func:`assess`.

Sample size and power (measured with ``bench/drift.py --power`` on a population like the clinical data; the
calibration tests in ``tests/fleet_server/test_drift_stats.py`` pin the key cells). The KS test's effective
size is ``n_e = n·m/(n+m)``, below the reference's ``n`` rows however large the windows ``m`` grow. A 0.3 SD
mean shift of one of 30 features is flagged on that feature, on every feature and every reference draw, with
a reference of ≥ 1,000 rows and windows holding ≥ 2,000 values (n_e ≈ 670; 3,000 reference rows need ≥ 1,000
values). With 360 reference rows, mean power is 0.88 at 1,000 values and 0.99 at 5,000, but near-normal
features stay near 0.5. With the packaged 114-row reference no window size is enough: mean power 0.27–0.55,
zero for near-normal features, because at n_e < 114 the smallest KS gap significant at Holm α = 0.01 over
30 features is ≈ 2.09/√114 ≈ 0.20, twice the ≈ 0.11 gap such a shift makes. The KS floor (0.075) sits
well below that ≈ 0.11: a floor at the target effect would make detecting it a coin flip at any size.
False alarms on unshifted windows: 0 of 100 seeds of 2,000 real clinical rows against the packaged
reference; 8 of 2,460 (0.3%) population windows over all power runs — within the family-wise α = 0.01 per
scope and evaluation. Package ≥ 1,000 calibration rows wherever drift matters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefleet_contracts.summary import LATENCY_EDGES_MS

from ..drift.registry import correct, get_statistic
from .policy import DataQualityPolicy, HealthPolicy, InputDriftPolicy, OutputDriftPolicy
from .reference import Layout, Reference

SCHEMA_ERRORS = ("missing_field", "unexpected_field", "wrong_shape", "invalid_input")
OPERATIONAL_ERRORS = ("inference", "other")


def latency_percentiles(counts: np.ndarray, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict[str, float | None]:
    """Percentiles (ms) from counts on ``LATENCY_EDGES_MS`` (+ underflow first, overflow last), interpolated
    geometrically inside a bin (the edges are log-spaced). Underflow reads as the first edge, overflow as
    the last (a lower bound)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    edges = np.asarray(LATENCY_EDGES_MS)
    out: dict[str, float | None] = {}
    cum = np.cumsum(counts)
    for q in qs:
        key = f"p{round(q * 100)}"
        if total <= 0:
            out[key] = None
            continue
        target = q * total
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(counts) - 1)
        if i == 0:
            out[key] = float(edges[0])
        elif i >= len(edges):
            out[key] = float(edges[-1])
        else:
            lo, hi = edges[i - 1], edges[i]
            before = cum[i - 1]
            frac = (target - before) / counts[i] if counts[i] else 1.0
            out[key] = round(float(lo * (hi / lo) ** min(max(frac, 0.0), 1.0)), 6)
    return out


def _input_drift(ref: np.ndarray, cur: np.ndarray, names: list[str], p: InputDriftPolicy) -> dict[str, Any]:
    stat = p.stat()
    m = cur.sum(axis=1)
    enough = m >= p.min_samples
    main = stat.compute_many(ref, cur)
    psi = get_statistic("psi").compute_many(ref, cur).statistic
    ks = main.statistic if stat.name == "ks" else get_statistic("ks").compute_many(ref, cur).statistic
    if main.p_value is not None:
        adj = np.ones(len(names))
        if enough.any():
            adj[enough] = correct(main.p_value[enough], p.correction)
        flagged = enough & (adj < p.alpha) & ((ks >= p.ks_floor) | (psi >= p.psi_floor))
    else:
        adj = None
        thr = stat.default_threshold if p.threshold is None else p.threshold
        flagged = enough & (main.statistic >= thr)
    feats = []
    for j, name in enumerate(names):
        feats.append({
            "feature": name, "verdict": "drift" if flagged[j] else ("ok" if enough[j] else "insufficient"),
            "statistic": round(float(main.statistic[j]), 6),
            "p_value": None if main.p_value is None else float(main.p_value[j]),
            "p_adjusted": None if adj is None else float(adj[j]),
            "ks": round(float(ks[j]), 6), "psi": round(float(psi[j]), 6), "n": int(m[j]),
        })
    order = np.lexsort((-main.statistic, adj if adj is not None else -main.statistic, ~flagged))
    feats = [feats[i] for i in order]
    return {"drifted": bool(flagged.any()), "statistic": stat.name, "correction": p.correction,
            "alpha": p.alpha, "drifted_features": [f["feature"] for f in feats if f["verdict"] == "drift"],
            "features": feats}


def cohens_w(ref: np.ndarray, cur: np.ndarray) -> float:
    """Effect size of a category-mix change: sqrt(Σ (q−p)²/p), reference shares Jeffreys-smoothed."""
    p = (ref + 0.5) / (ref.sum() + 0.5 * ref.size)
    q = cur / cur.sum() if cur.sum() else np.zeros_like(cur)
    return float(np.sqrt(((q - p) ** 2 / p).sum()))


def _output_drift(ref: Reference, layout: Layout, vec: np.ndarray, p: OutputDriftPolicy) -> dict[str, Any]:
    rc = np.asarray(ref.profile.class_counts, dtype=np.float64)
    cc = layout.part(vec, "classes")
    rconf = np.asarray(ref.profile.confidence_counts, dtype=np.float64)
    cconf = layout.part(vec, "conf")
    n = int(cc.sum())
    mix = get_statistic("chi_square").compute(rc, cc)
    conf = get_statistic("ks").compute(rconf, cconf)
    raw = [1.0 if r.p_value is None else r.p_value for r in (mix, conf)]
    adj = correct(np.asarray(raw), "holm")
    w = cohens_w(rc, cc)
    enough = n >= p.min_samples
    mix_drift = enough and adj[0] < p.alpha and w >= p.class_effect_floor
    conf_drift = enough and adj[1] < p.alpha and conf.statistic >= p.confidence_floor
    share = (cc / n).round(4).tolist() if n else [0.0] * len(cc)
    return {
        "drifted": bool(mix_drift or conf_drift), "n": n, "insufficient": not enough,
        "class_mix": {"drifted": bool(mix_drift), "statistic": "chi_square", "chi2": round(mix.statistic, 4),
                      "p_value": mix.p_value, "p_adjusted": float(adj[0]), "cohens_w": round(w, 4),
                      "classes": ref.profile.classes, "current_share": share,
                      "reference_share": (rc / rc.sum()).round(4).tolist() if rc.sum() else share},
        "confidence": {"drifted": bool(conf_drift), "statistic": "ks", "ks": round(conf.statistic, 4),
                       "p_value": conf.p_value, "p_adjusted": float(adj[1])},
    }


def _data_quality(layout: Layout, vec: np.ndarray, requests: int, p: DataQualityPolicy) -> dict[str, Any]:
    errs = dict(zip(layout.error_kinds, layout.part(vec, "errors").astype(int).tolist(), strict=True))
    denom = max(requests, 1)
    schema = sum(errs[k] for k in SCHEMA_ERRORS)
    feats: list[dict[str, Any]] = []
    issues: list[dict[str, Any]] = []
    enough = requests >= p.min_requests
    for j, name in enumerate(layout.names):
        rates = {"missing_rate": layout.part(vec, "missing")[j] / denom, "nan_rate": layout.part(vec, "nan")[j] / denom,
                 "out_of_range_rate": layout.part(vec, "oor")[j] / denom}
        feats.append({"feature": name, **{k: round(float(v), 6) for k, v in rates.items()}})
        for key, limit in (("missing_rate", p.max_missing_rate), ("nan_rate", p.max_nan_rate),
                           ("out_of_range_rate", p.max_out_of_range_rate)):
            if enough and rates[key] > limit:
                issues.append({"feature": name, "signal": key, "rate": round(float(rates[key]), 6), "max": limit})
    schema_rate = schema / denom
    if enough and schema_rate > p.max_schema_error_rate:
        issues.append({"feature": None, "signal": "schema_error_rate", "rate": round(schema_rate, 6),
                       "max": p.max_schema_error_rate})
    feats.sort(key=lambda f: -float(f["missing_rate"] + f["nan_rate"] + f["out_of_range_rate"]))
    return {"flagged": bool(issues), "requests": requests, "schema_error_rate": round(schema_rate, 6),
            "schema_errors": {k: errs[k] for k in SCHEMA_ERRORS}, "issues": issues, "features": feats}


def assess(ref: Reference, layout: Layout, vec: np.ndarray, policy: HealthPolicy) -> dict[str, Any]:
    """The four signals (and data quality) for one summed vector. Pure."""
    count, windows, empty, summaries = layout.scalars(vec)
    errs = layout.part(vec, "errors")
    n_err = int(errs.sum())
    requests = count + n_err
    op_err = int(sum(errs[layout.error_kinds.index(k)] for k in OPERATIONAL_ERRORS))
    cur = layout.feature_matrix_from(layout.part(vec, "bins"))
    confusion = layout.part(vec, "confusion").reshape(layout.n_classes, layout.n_classes)
    labels = int(confusion.sum())
    share = empty / (count * layout.n_features) if count and layout.n_features else 0.0
    estimated = float(layout.part(vec, "cal").sum() / count) if count else None
    return {
        "summaries": summaries, "windows": windows, "count": count, "requests": requests,
        "input_drift": _input_drift(layout.reference, cur, layout.names, policy.input_drift),
        "output_drift": _output_drift(ref, layout, vec, policy.output_drift),
        "data_quality": _data_quality(layout, vec, requests, policy.data_quality),
        "operations": {
            "latency_ms": latency_percentiles(layout.part(vec, "latency")),
            "error_rate": round(n_err / requests, 6) if requests else 0.0,
            "operational_error_rate": round(op_err / requests, 6) if requests else 0.0,
            "errors": {k: int(v) for k, v in zip(layout.error_kinds, errs, strict=True) if v},
        },
        "accuracy": {
            "measured": {"accuracy": round(float(np.trace(confusion) / labels), 6), "labels": labels}
            if labels else None,
            "estimated": None if estimated is None else round(estimated, 6),
            "trustworthy": bool(share <= policy.trust.max_empty_share),
            "empty_bin_share": round(share, 6), "max_empty_share": policy.trust.max_empty_share,
            "reference": ref.accuracy, "reference_source": ref.accuracy_source,
        },
    }


def compact(h: dict[str, Any]) -> dict[str, Any]:
    """A short per-device form of :func:`assess`'s result (verdicts and headline numbers)."""
    worst = h["input_drift"]["features"][0] if h["input_drift"]["features"] else None
    return {
        "summaries": h["summaries"], "count": h["count"],
        "input_drift": {"drifted": h["input_drift"]["drifted"],
                        "drifted_features": h["input_drift"]["drifted_features"], "worst": worst},
        "output_drift": {"drifted": h["output_drift"]["drifted"]},
        "data_quality": {"flagged": h["data_quality"]["flagged"], "issues": h["data_quality"]["issues"]},
        "operations": {"p95_ms": h["operations"]["latency_ms"]["p95"], "error_rate": h["operations"]["error_rate"]},
        "accuracy": {k: h["accuracy"][k] for k in ("measured", "estimated", "trustworthy")},
    }
