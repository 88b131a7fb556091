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

Noised summaries (``dp_epsilon`` on the devices). Their histogram counts carry unbiased Laplace noise (see
``edgefleet_contracts.summary``), and the summed vector knows the noise's variance per count, σ² (the sum over
releases of 2/ε² + 1/12). Counts are clipped at zero after adding, and each p-value test then sees the
current sample at its *effective* size, the size whose sampling variance equals sampling plus noise:

- KS (input features, confidence): at a mid edge the ECDF's sampling variance is ≈ 1/(4m) and the noise
  adds ≈ (K/2)·σ²/m² (half of the K bins' noise before the edge), so ``m_eff = m² / (m + 2·K·σ²)``;
- chi-square (class mix): a cell's variance m·p_i + σ² makes ``E[X²] = (K−1) + σ²/m·Σ 1/p_i``, so the
  current counts are scaled by ``(K−1) / ((K−1) + σ²/m·Σ 1/p_i)`` (p_i the reference shares).

Effect sizes (KS gap, PSI, Cohen's w) are read from the clipped counts, unscaled. The price is power: with
ε = 1 and 50-value windows (σ² ≈ 2.1 per window) a feature of 22 bins has m_eff ≈ m / 2.8, so a scope
needs about three times the values to see the same shift. Measured in
``tests/fleet_server/test_drift_noise.py``: noised windows from the reference population raise no drift,
and a 0.3 SD shift is still caught with three times the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefleet_contracts.summary import LATENCY_EDGES_MS

from ..drift.ks import p_value as ks_p_value
from ..drift.registry import StatBatch, correct, get_statistic
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


def effective_counts(counts: np.ndarray, bins: np.ndarray, noise_var: float) -> tuple[np.ndarray, np.ndarray]:
    """Summed counts ``[R, K]`` -> (the counts scaled to each row's effective sample size for a KS test, that
    size ``[R]``). Noised counts stay signed: the KS test reads only their cumulative sums, which the noise
    leaves unbiased, whereas clipping each bin at zero would pile the empty bins' noise up at one end (a gap of
    0.15 in the confidence ECDF at epsilon 0.25). Without noise: the counts and their totals, unchanged."""
    m = counts.sum(axis=1)
    if noise_var <= 0:
        return counts, m
    m = np.maximum(m, 0.0)
    m_eff = m * m / np.maximum(m + 2.0 * bins * noise_var, 1e-12)
    scale = np.where(m > 0, m_eff / np.where(m > 0, m, 1.0), 0.0)
    return counts * scale[:, None], m_eff


def _ks_signed(ref: np.ndarray, counts: np.ndarray) -> StatBatch:
    """KS on counts that may be signed (noised): the statistic's function itself is defined for them."""
    return get_statistic("ks").compute_many(ref, counts, allow_negative=True)


def _input_drift(ref: np.ndarray, noisy: np.ndarray, bins: np.ndarray, noise_var: float, names: list[str],
                 p: InputDriftPolicy, n_values: np.ndarray | None = None) -> dict[str, Any]:
    """``n_values``: the values binned per feature, as the devices counted them (exact: noise covers only the
    histograms); without it, the histograms' totals."""
    stat = p.stat()
    cur = np.clip(noisy, 0.0, None)  # for the distances (PSI, ...), which need proportions
    m = cur.sum(axis=1)
    tested, m_eff = effective_counts(noisy, bins, noise_var)
    # Enough data is judged on the effective sample size: with noised counts the clipped totals (m) overstate
    # it (the noise of the empty bins, clipped at zero, only adds), and the test has only m_eff values' power.
    enough = m_eff >= p.min_samples
    if stat.threshold_kind == "p_value":
        # A reference so small that even the largest gap (every value moved past every reference value, KS 1)
        # could not reach alpha across the features can detect nothing: "insufficient", not a reassuring "ok".
        enough &= ks_p_value(np.ones(len(names)), ref.sum(axis=1), m_eff) * max(len(names), 1) < p.alpha
    if n_values is None:
        n_values = np.maximum(noisy.sum(axis=1), 0.0)
    ks_batch = _ks_signed(ref, tested)
    main = ks_batch if stat.name == "ks" else stat.compute_many(ref, cur * (m_eff / np.maximum(m, 1e-12))[:, None])
    ks = ks_batch.statistic
    psi = get_statistic("psi").compute_many(ref, cur).statistic
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
            "ks": round(float(ks[j]), 6), "psi": round(float(psi[j]), 6), "n": int(round(n_values[j])),
            **({"n_effective": round(float(m_eff[j]), 1)} if noise_var > 0 else {}),
        })
    order = np.lexsort((-main.statistic, adj if adj is not None else -main.statistic, ~flagged))
    feats = [feats[i] for i in order]
    return {"drifted": bool(flagged.any()), "statistic": stat.name, "correction": p.correction,
            "alpha": p.alpha, "noise_variance": round(noise_var, 6),
            "drifted_features": [f["feature"] for f in feats if f["verdict"] == "drift"], "features": feats}


def cohens_w(ref: np.ndarray, cur: np.ndarray) -> float:
    """Effect size of a category-mix change: sqrt(Σ (q−p)²/p), reference shares Jeffreys-smoothed."""
    p = (ref + 0.5) / (ref.sum() + 0.5 * ref.size)
    q = cur / cur.sum() if cur.sum() else np.zeros_like(cur)
    return float(np.sqrt(((q - p) ** 2 / p).sum()))


def _class_mix_scale(ref: np.ndarray, m: float, noise_var: float) -> float:
    """How far to scale noised class counts so the chi-square test sees their effective size (module doc)."""
    k = ref.size
    if noise_var <= 0 or m <= 0 or k < 2:
        return 1.0
    shares = (ref + 0.5) / (ref.sum() + 0.5 * k)
    return float((k - 1) / ((k - 1) + noise_var / m * (1.0 / shares).sum()))


def _output_drift(ref: Reference, layout: Layout, vec: np.ndarray, p: OutputDriftPolicy) -> dict[str, Any]:
    noise_var = layout.noise_variance(vec)
    rc = np.asarray(ref.profile.class_counts, dtype=np.float64)
    cc = np.clip(layout.part(vec, "classes"), 0.0, None)
    rconf = np.asarray(ref.profile.confidence_counts, dtype=np.float64)
    raw_conf = layout.part(vec, "conf")
    n = int(cc.sum())
    mix = get_statistic("chi_square").compute(rc, cc * _class_mix_scale(rc, float(n), noise_var))
    tested_conf, _ = effective_counts(raw_conf[None, :], np.asarray([raw_conf.size]), noise_var)
    conf = _ks_signed(rconf[None, :], tested_conf).row(0)
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


def _worst_empty_share(ref: np.ndarray, cur: np.ndarray, names: list[str]) -> tuple[str | None, float]:
    """The feature with the largest share of its values in bins empty in the reference, and that share."""
    if cur.size == 0:
        return None, 0.0
    totals = cur.sum(axis=1)
    in_empty = np.where(ref <= 0, cur, 0.0).sum(axis=1)
    shares = np.where(totals > 0, np.clip(in_empty / np.where(totals > 0, totals, 1.0), 0.0, 1.0), 0.0)
    j = int(np.argmax(shares))
    return names[j], float(shares[j])


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
    # The same share feature by feature, from the counts against the reference (signed: noise sums to ~0): one
    # feature whose values all fall where the reference had none is diluted to 1/F in the share above.
    worst_feature, worst_share = _worst_empty_share(layout.reference, cur, layout.names)
    estimated = float(layout.part(vec, "cal").sum() / count) if count else None
    return {
        "summaries": summaries, "windows": windows, "count": count, "requests": requests,
        "input_drift": _input_drift(layout.reference, cur, np.asarray(layout.sizes, dtype=np.float64),
                                    layout.noise_variance(vec), layout.names, policy.input_drift,
                                    layout.part(vec, "n")),
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
            "trustworthy": bool(share <= policy.trust.max_empty_share
                                and worst_share <= policy.trust.max_feature_empty_share),
            "empty_bin_share": round(share, 6), "max_empty_share": policy.trust.max_empty_share,
            "worst_feature_empty_share": {"feature": worst_feature, "share": round(worst_share, 6)},
            "max_feature_empty_share": policy.trust.max_feature_empty_share,
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
