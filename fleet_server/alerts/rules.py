"""Alert rules: the defaults, a model's overrides (``models.alert_rules`` JSON) and their validation.

Rules: input drift, output drift, data quality (missing / NaN / out-of-range / schema-error rates), accuracy
drop (measured with ≥ ``min_labels`` labels, else the label-free estimate — only when it is trustworthy —
against the package's evaluation accuracy or its calibration map), error rate, p95 latency. Each section can
be turned off (``"enabled": false``) and each setting overridden; :func:`parse_rules` refuses an unknown key
or a value of the wrong type, naming it and listing the valid ones.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from edgefleet_contracts.process import warn_once

from ..drift import CORRECTIONS
from ..errors import NotFoundError, RequestError
from ..health import HealthPolicy
from ..store import Store

log = logging.getLogger("edgefleet.alerts")

KINDS = ("input_drift", "output_drift", "data_quality", "accuracy_drop", "error_rate", "latency_p95",
         "retraining_due")
SEVERITY = {"input_drift": "warning", "output_drift": "warning", "data_quality": "warning",
            "accuracy_drop": "critical", "error_rate": "critical", "latency_p95": "warning", "retraining_due": "info"}


@dataclass(frozen=True)
class AccuracyRule:
    max_drop: float = 0.05  # absolute, below the package's accuracy
    min_count: int = 200  # predictions before a label-free estimate is trusted
    min_labels: int = 100  # labels before the measured accuracy is used instead


@dataclass(frozen=True)
class ErrorRateRule:
    max_rate: float = 0.05  # failed or rejected requests / requests
    min_requests: int = 100


@dataclass(frozen=True)
class LatencyRule:
    max_p95_ms: float = 250.0
    min_count: int = 100


@dataclass(frozen=True)
class AlertRules:
    health: HealthPolicy = field(default_factory=HealthPolicy)
    accuracy_drop: AccuracyRule = field(default_factory=AccuracyRule)
    error_rate: ErrorRateRule = field(default_factory=ErrorRateRule)
    latency_p95: LatencyRule = field(default_factory=LatencyRule)
    enabled: dict[str, bool] = field(default_factory=lambda: {k: True for k in KINDS})
    window_s: float = 86400.0
    resolve_after_s: float | None = 3600.0
    cooldown_s: float = 3600.0
    cohort_tags: list[str] | None = None  # None: every tag key the reporting devices carry
    # Pending period: a new alert's page waits this long and then carries the evidence of the latest
    # evaluation (its headline may sharpen as late devices' windows arrive). 0: page at once.
    settle_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"window_s": self.window_s, "resolve_after_s": self.resolve_after_s,
                             "cooldown_s": self.cooldown_s, "cohort_tags": self.cohort_tags,
                             "settle_s": self.settle_s}
        for name, obj in _sections(self).items():
            d[name] = {"enabled": self.enabled.get(name, True), **{f.name: getattr(obj, f.name) for f in fields(obj)}}
        return d


MAX_SPAN_S = 366 * 86400  # the longest window, cooldown or auto-resolve delay a rule may set


def _is_number(v: Any) -> bool:
    """A finite int or float, not a bool (JSON's 1e400 arrives as infinity)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _sections(r: AlertRules) -> dict[str, Any]:
    return {"input_drift": r.health.input_drift, "output_drift": r.health.output_drift,
            "data_quality": r.health.data_quality, "trust": r.health.trust, "accuracy_drop": r.accuracy_drop,
            "error_rate": r.error_rate, "latency_p95": r.latency_p95}


def _override(obj: Any, doc: Any, where: str) -> Any:
    if not isinstance(doc, dict):
        raise RequestError(f"alert_rules.{where} must be an object")
    names = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for k, v in doc.items():
        if k not in names:
            raise RequestError(f"alert_rules.{where}.{k} is not a setting; settings: enabled, {', '.join(names)}")
        cur, optional = getattr(obj, k), "None" in str(names[k].type)
        if v is None:
            ok = optional
        elif isinstance(cur, str):
            ok = isinstance(v, str)
        elif isinstance(cur, int) and not isinstance(cur, bool) and "float" not in str(names[k].type):
            ok = isinstance(v, int) and not isinstance(v, bool)
            if ok and v < 0:
                raise RequestError(f"alert_rules.{where}.{k} must be a whole number, 0 or more, not {v!r}")
        else:
            ok = _is_number(v)
            if ok and v < 0:
                raise RequestError(f"alert_rules.{where}.{k} must be a finite number, 0 or more, not {v!r}")
        if not ok:
            raise RequestError(f"alert_rules.{where}.{k} = {v!r} has the wrong type (default {cur!r})")
        changes[k] = v
    return replace(obj, **changes)


def parse_rules(doc: Any, *, strict: bool = True) -> AlertRules:
    """Defaults overridden by a ``models.alert_rules`` document. Raises RequestError naming the bad key and
    listing the valid ones. ``strict=False`` for stored documents: a value :func:`_check_values` refuses (one
    that was accepted before it existed) falls back to its default instead of the whole document."""
    if doc is None or doc == {}:
        return AlertRules()
    if not isinstance(doc, dict):
        raise RequestError("alert_rules must be a JSON object")
    r = AlertRules()
    secs = _sections(r)
    enabled = dict(r.enabled)
    top: dict[str, Any] = {}
    for k, v in doc.items():
        if k in secs:
            v = dict(v) if isinstance(v, dict) else v
            if isinstance(v, dict) and "enabled" in v:
                if not isinstance(v["enabled"], bool):
                    raise RequestError(f"alert_rules.{k}.enabled must be true or false")
                enabled[k] = v.pop("enabled")
            secs[k] = _override(secs[k], v, k)
        elif k in ("window_s", "cooldown_s", "resolve_after_s"):
            if not ((_is_number(v) and 0 < v <= MAX_SPAN_S) or (v is None and k == "resolve_after_s")):
                raise RequestError(f"alert_rules.{k} must be a number of seconds over 0 and at most 366 days "
                                   f"({MAX_SPAN_S:,} s)" + (" or null (resolve by hand only)"
                                                            if k == "resolve_after_s" else "") + f", not {v!r}")
            top[k] = v
        elif k == "settle_s":
            if not (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 86400):
                raise RequestError("alert_rules.settle_s must be a number of seconds from 0 to 86400")
            top[k] = v
        elif k == "cohort_tags":
            if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
                raise RequestError("alert_rules.cohort_tags must be a list of tag names or null (every tag)")
            top[k] = v
        else:
            raise RequestError(f"alert_rules.{k} is not a rule; rules: {', '.join(secs)}, window_s, resolve_after_s, "
                               "cooldown_s, settle_s, cohort_tags")
    _check_values(secs, top, strict)
    health = HealthPolicy(secs["input_drift"], secs["output_drift"], secs["data_quality"], secs["trust"])
    return replace(r, health=health, accuracy_drop=secs["accuracy_drop"], error_rate=secs["error_rate"],
                   latency_p95=secs["latency_p95"], enabled=enabled, **top)


# Settings that are probabilities, rates or shares: 0 to 1 (alpha: over 0 and under 1).
_FRACTIONS = {"input_drift": ("ks_floor",), "output_drift": ("confidence_floor",),
              "data_quality": ("max_missing_rate", "max_nan_rate", "max_out_of_range_rate", "max_schema_error_rate"),
              "trust": ("max_empty_share", "max_feature_empty_share"), "accuracy_drop": ("max_drop",),
              "error_rate": ("max_rate",)}


def _check_values(secs: dict[str, Any], top: dict[str, Any], strict: bool) -> None:
    """What the types alone do not catch: a correction that does not exist (which would otherwise fail every
    evaluation of the model, silently ending its alerts), a probability or rate outside 0..1, a threshold the
    statistic does not read, an empty tag name.

    ``strict`` (rules being set): raises RequestError naming the first such setting. Otherwise (rules stored before
    these checks existed) each such setting alone goes back to its default, in place, and is logged once; the
    rest of the document (what is turned off, the window, the cohort tags) is kept."""
    defaults = _sections(AlertRules())

    def bad(section: str, key: str, message: str) -> None:
        if strict:
            raise RequestError(message)
        if warn_once(("alert_rules", message)):
            log.warning("stored %s; using the default %r instead (set the rules again to change it)", message,
                        getattr(defaults[section], key))
        secs[section] = replace(secs[section], **{key: getattr(defaults[section], key)})

    drift = secs["input_drift"]
    stat = drift.stat()  # an unknown or categorical statistic fails here, listing the choices (strict or not)
    if drift.correction not in CORRECTIONS:
        bad("input_drift", "correction", f"alert_rules.input_drift.correction {drift.correction!r} is not a "
            f"correction; corrections: {', '.join(CORRECTIONS)}")
    if drift.threshold is not None and stat.threshold_kind != "distance":
        bad("input_drift", "threshold", "alert_rules.input_drift.threshold applies to distance statistics (psi, "
            f"jensen_shannon); {stat.name} is judged by alpha and its effect floors")
    for name in ("input_drift", "output_drift"):
        alpha = secs[name].alpha
        if not 0 < alpha < 1:
            bad(name, "alpha", f"alert_rules.{name}.alpha is a probability over 0 and under 1 (0.01 by default), "
                f"not {alpha!r}")
    for name, keys in _FRACTIONS.items():
        for k in keys:
            v = getattr(secs[name], k)
            if not 0 <= v <= 1:
                bad(name, k, f"alert_rules.{name}.{k} is a fraction from 0 to 1, not {v!r}")
    tags = top.get("cohort_tags")
    if tags is not None and not all(t.strip() for t in tags):
        if strict:
            raise RequestError("alert_rules.cohort_tags must name tags: an empty name matches no device")
        top["cohort_tags"] = [t for t in tags if t.strip()] or None


def rules_for(store: Store, model: str) -> AlertRules:
    """The effective rules of a model. Raises NotFoundError for an unknown model, RequestError for bad rules."""
    row = store.one("SELECT alert_rules FROM models WHERE name = ?", (model,))
    if row is None:
        known = [r["name"] for r in store.query("SELECT name FROM models ORDER BY name")]
        raise NotFoundError(f"unknown model {model!r}; known: {', '.join(known) or 'none'}")
    return parse_rules(json.loads(row["alert_rules"] or "{}"), strict=False)


def set_rules(store: Store, model: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate and store a model's rule overrides (replacing earlier ones); return the effective rules."""
    rules = parse_rules(overrides)
    with store.write() as c:
        if c.execute("UPDATE models SET alert_rules = ? WHERE name = ?",
                     (json.dumps(overrides, sort_keys=True), model)).rowcount == 0:
            raise NotFoundError(f"unknown model {model!r}")
    return rules.to_dict()
