"""Health of a model version from stored summaries: the four monitoring signals per device, cohort and fleet.

Summaries are counts on the reference profile's bins, so aggregation is addition: every stored summary of a
model version in a time range becomes one flat vector (:class:`Layout`), vectors add per device, device
totals add per cohort tag value (``devices.tags``) and fleet-wide, and each total is compared with the
reference profile (:func:`assess`):

- **input drift** per feature: the policy's statistic (default binned two-sample KS, whose p-value counts
  the reference's size as well as the window's), corrected across features (Holm), and flagged only when the
  corrected p-value is below ``alpha`` AND an effect-size floor is met (KS ≥ 0.075 or PSI ≥ 0.25): false alarms
  cost more than misses. Features are listed worst first. Missing / NaN / out-of-range / schema-error rates
  are their own *data quality* signal with thresholds.
- **output drift**: the predicted-class mix against the reference's class counts (two-sample chi-square with
  small-count pooling, effect Cohen's w) and the confidence histogram (binned KS), Holm-corrected as a pair.
- **operations**: latency p50/p95/p99 recovered from the log-spaced histogram, error rates.
- **accuracy**: measured from confusion counts where labels were fed back; estimated without labels as
  ``sum(calibrated_sum) / count``, marked ``trustworthy: false`` when the share of values that fell in bins
  empty in the reference (``empty_bins / (count × n_features)``) exceeds a threshold — the calibration map
  says nothing about inputs it never saw.

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

SQL lives only in ``Reference.load``, ``load_aggregate``, ``latest_version`` and ``report``; ``assess`` and the
signal functions are pure (plain data in, plain data out).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.summary import ERROR_KINDS, LATENCY_EDGES_MS
from edgefleet_contracts.timeutil import fmt, parse, parse_duration

from .drift.registry import Statistic, correct, get_statistic
from .errors import NotFoundError, RequestError
from .registry import profile_of, version_row
from .store import Store

DEFAULT_LOOKBACK_S = 86400.0
SCHEMA_ERRORS = ("missing_field", "unexpected_field", "wrong_shape", "invalid_input")
OPERATIONAL_ERRORS = ("inference", "other")
UNTAGGED = "(none)"


# ---- policies (defaults; overridable per model through models.alert_rules, see fleet_server.alerts) ---------

@dataclass(frozen=True)
class InputDriftPolicy:
    statistic: str = "ks"  # a numerical statistic from fleet_server.drift
    correction: str = "holm"  # across features: holm | bonferroni
    alpha: float = 0.01  # family-wise, per scope and evaluation
    ks_floor: float = 0.075  # effect floor: KS statistic (max ECDF difference; 0.3 SD normal shift ~ 0.11) ...
    psi_floor: float = 0.25  # ... or PSI
    threshold: float | None = None  # for distance statistics (psi, jensen_shannon): flag at >= threshold
    min_samples: int = 100  # current values per feature below which the verdict is "insufficient"

    def stat(self) -> Statistic:
        s = get_statistic(self.statistic)
        if "numerical" not in s.feature_types:
            raise RequestError(f"input_drift.statistic {self.statistic!r} is for categorical data; use ks, psi or "
                               "jensen_shannon")
        return s


@dataclass(frozen=True)
class OutputDriftPolicy:
    alpha: float = 0.01  # family-wise over the pair (class mix, confidence)
    class_effect_floor: float = 0.1  # Cohen's w of the class mix (0.1 small, 0.3 medium)
    confidence_floor: float = 0.1  # KS statistic of the confidence histogram
    min_samples: int = 100


@dataclass(frozen=True)
class DataQualityPolicy:
    max_missing_rate: float = 0.02
    max_nan_rate: float = 0.02
    max_out_of_range_rate: float = 0.01
    max_schema_error_rate: float = 0.01
    min_requests: int = 100


@dataclass(frozen=True)
class TrustPolicy:
    max_empty_share: float = 0.05  # share of values in reference-empty bins above which estimates are untrusted


@dataclass(frozen=True)
class HealthPolicy:
    input_drift: InputDriftPolicy = field(default_factory=InputDriftPolicy)
    output_drift: OutputDriftPolicy = field(default_factory=OutputDriftPolicy)
    data_quality: DataQualityPolicy = field(default_factory=DataQualityPolicy)
    trust: TrustPolicy = field(default_factory=TrustPolicy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the reference a version is compared with --------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    model: str
    version: str
    profile: Profile
    calibration: CalibrationMap
    accuracy: float | None  # what the package promised: evaluation accuracy, else the calibration map's
    accuracy_source: str

    @classmethod
    def load(cls, store: Store, model: str, version: str) -> Reference:
        """Raises NotFoundError when the version is not published."""
        prof, cal = profile_of(store, model, version)
        profile, calibration = Profile.from_dict(prof), CalibrationMap.from_dict(cal)
        evaluation = json.loads(version_row(store, model, version)["manifest"]).get("evaluation") or {}
        acc = evaluation.get("accuracy")
        if isinstance(acc, int | float) and not isinstance(acc, bool):
            return cls(model, version, profile, calibration, float(acc), "package evaluation (holdout)")
        w = np.asarray(calibration.counts, dtype=np.float64)
        if w.sum() > 0:
            mean = float((np.asarray(calibration.accuracy) * w).sum() / w.sum())
            return cls(model, version, profile, calibration, mean, "calibration map (count-weighted)")
        return cls(model, version, profile, calibration, None, "none")


class Layout:
    """Where each summary field sits in one flat float vector, so summaries of a version add as arrays."""

    def __init__(self, profile: Profile) -> None:
        self.names = [f.name for f in profile.features]
        self.sizes = [len(f.edges) + 1 for f in profile.features]
        self.n_features = len(self.names)
        self.n_classes = len(profile.classes)
        self.n_conf = len(profile.confidence_counts)
        self.width = max(self.sizes, default=1)
        self.error_kinds = list(ERROR_KINDS)
        f, c = self.n_features, self.n_classes
        spans = [("bins", sum(self.sizes)), ("missing", f), ("nan", f), ("oor", f), ("n", f), ("classes", c),
                 ("conf", self.n_conf), ("cal", c), ("latency", len(LATENCY_EDGES_MS) + 1),
                 ("errors", len(self.error_kinds)), ("confusion", c * c), ("scalars", 4)]
        self.slices: dict[str, slice] = {}
        at = 0
        for name, size in spans:
            self.slices[name] = slice(at, at + size)
            at += size
        self.size = at
        # scatter index: flat bins -> [feature, bin] of a zero-padded [F, width] matrix
        self._pad_index = np.concatenate([j * self.width + np.arange(s) for j, s in enumerate(self.sizes)]) \
            if self.sizes else np.zeros(0, dtype=np.int64)
        self.reference = self.feature_matrix_from(np.concatenate([np.asarray(p.counts, dtype=np.float64)
                                                                  for p in profile.features]))

    def row(self, body: dict[str, Any]) -> np.ndarray | None:
        """One stored summary body as a vector; None when its bins do not match the profile's."""
        feats = body.get("features") or []
        out, ops = body.get("output") or {}, body.get("ops") or {}
        if len(feats) != self.n_features:
            return None
        vals: list[float] = []
        extra: list[list[float]] = [[], [], [], []]
        for fd, size in zip(feats, self.sizes, strict=True):
            counts = fd.get("counts") or []
            if len(counts) != size:
                return None
            vals.extend(counts)
            extra[0].append(fd.get("missing", 0))
            extra[1].append(fd.get("nan", 0))
            extra[2].append(fd.get("out_of_range", 0))
            extra[3].append(fd.get("n", 0))
        for e in extra:
            vals.extend(e)
        classes = out.get("class_counts") or []
        conf = out.get("confidence_counts") or []
        cal = out.get("calibrated_sum") or []
        lat = ops.get("latency_counts") or []
        if len(classes) != self.n_classes or len(conf) != self.n_conf or len(cal) != self.n_classes \
                or len(lat) != len(LATENCY_EDGES_MS) + 1:
            return None
        vals.extend(classes)
        vals.extend(conf)
        vals.extend(cal)
        vals.extend(lat)
        errs = [0.0] * len(self.error_kinds)
        for kind, v in (ops.get("errors") or {}).items():
            errs[self.error_kinds.index(kind) if kind in self.error_kinds else self.error_kinds.index("other")] += v
        vals.extend(errs)
        confusion = (body.get("labels") or {}).get("confusion")
        if confusion is not None and len(confusion) == self.n_classes:
            for r in confusion:
                vals.extend(r)
        else:
            vals.extend([0.0] * (self.n_classes * self.n_classes))
        win = body.get("window") or {}
        vals.extend([win.get("count", 0), win.get("windows", 1), out.get("empty_bins", 0), 1.0])
        vec = np.asarray(vals, dtype=np.float64)
        return vec if vec.size == self.size else None

    def feature_matrix_from(self, flat_bins: np.ndarray) -> np.ndarray:
        m = np.zeros(self.n_features * self.width)
        m[self._pad_index] = flat_bins
        return m.reshape(self.n_features, self.width)

    def part(self, vec: np.ndarray, name: str) -> np.ndarray:
        return vec[self.slices[name]]

    def scalars(self, vec: np.ndarray) -> tuple[int, int, int, int]:
        """(predictions, raw windows, values in reference-empty bins, stored summaries)."""
        s = vec[self.slices["scalars"]]
        return int(s[0]), int(s[1]), int(s[2]), int(s[3])


# ---- aggregation (SQL) ------------------------------------------------------------------------------------

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


def load_aggregate(store: Store, reference: Reference, since: str, until: str) -> Aggregate:
    """Sum the stored summaries of ``reference``'s version whose windows overlap ``[since, until)``.

    Window times are compared as the canonical ``YYYY-MM-DDTHH:MM:SSZ`` strings ingest stores."""
    layout = Layout(reference.profile)
    rows = store.conn().execute(
        "SELECT device_id, window_start, window_end, body FROM summaries WHERE model = ? AND version = ?"
        " AND window_end > ? AND window_start < ?", (reference.model, reference.version, since, until))
    devices: dict[str, np.ndarray] = {}
    spans: dict[str, tuple[str, str]] = {}
    skipped = 0
    for device_id, start, end, body in rows:
        vec = layout.row(json.loads(body))
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


# ---- the four signals (pure) ------------------------------------------------------------------------------

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


def report(store: Store, model: str, version: str | None = None, *, since: str | float | None = None,
           until: str | float | None = None, by: str | None = None, policy: HealthPolicy | None = None,
           devices: str = "compact", now: float | None = None) -> dict[str, Any]:
    """Health of ``model`` ``version`` (default: the newest published) fleet-wide, per value of tag ``by``,
    and per device (``devices``: ``compact`` | ``full`` | ``none``), worst first.

    Raises NotFoundError (unknown model/version) or RequestError (bad time range or parameter)."""
    if devices not in ("compact", "full", "none"):
        raise RequestError(f"devices={devices!r} must be compact, full or none")
    version = version or latest_version(store, model)
    policy = policy or HealthPolicy()
    a, b = time_range(since, until, now)
    ref = Reference.load(store, model, version)
    agg = load_aggregate(store, ref, a, b)
    ids = sorted(agg.devices)
    out: dict[str, Any] = {
        "model": model, "version": version, "since": a, "until": b, "reference_rows": ref.profile.n,
        "policy": policy.to_dict(), "skipped_summaries": agg.skipped,
        "fleet": _scope(agg, ids, policy),
    }
    if by:
        out["by"] = by
        out["cohorts"] = {value: _scope(agg, members, policy) for value, members in agg.cohorts(by).items()}
    if devices != "none":
        per = []
        for d in ids:
            h = _scope(agg, [d], policy)
            entry = h if devices == "full" else {"window": h["window"], **compact(h)}
            per.append((_severity(h), {"device_id": d, "tags": agg.tags.get(d, {}), **entry}))
        per.sort(key=lambda t: (t[0], t[1]["device_id"]))
        out["devices"] = [e for _, e in per]
    return out
