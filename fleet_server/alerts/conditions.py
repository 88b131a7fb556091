"""Alert conditions, pure: which rules one scope's health meets (:func:`conditions`), which scopes are judged
(:func:`scopes`: the fleet and each proper tag cohort) and how the conditions of one version and kind across
scopes become one page (:func:`group_conditions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..health import UNTAGGED, Aggregate
from .rules import AlertRules

GROUPED = "grouped"


@dataclass(frozen=True)
class Condition:
    kind: str
    scope: str
    summary: str
    evidence: dict[str, Any]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def conditions(model: str, version: str, scope: str, h: dict[str, Any], rules: AlertRules,
               context: dict[str, Any]) -> list[Condition]:
    """The alert conditions one scope's health (:func:`fleet_server.health.assess` + window/devices) meets."""
    on = rules.enabled
    where = f"{model} {version} ({scope})"
    out: list[Condition] = []
    if on.get("input_drift", True) and h["input_drift"]["drifted"]:
        feats = [f for f in h["input_drift"]["features"] if f["verdict"] == "drift"]
        w = feats[0]
        p_adj = "" if w["p_adjusted"] is None else f", p_adj={w['p_adjusted']:.2g}"
        out.append(Condition("input_drift", scope,
                             f"{where}: input drift on {len(feats)} feature(s); worst {w['feature']} "
                             f"({h['input_drift']['statistic']} {w['statistic']:.3f}{p_adj})",
                             {**context, "statistic": h["input_drift"]["statistic"],
                              "correction": h["input_drift"]["correction"], "alpha": h["input_drift"]["alpha"],
                              "features": feats[:10], "drifted_features": len(feats)}))
    od = h["output_drift"]
    if on.get("output_drift", True) and od["drifted"]:
        out.append(Condition("output_drift", scope,
                             f"{where}: output drift (class mix w={od['class_mix']['cohens_w']}, "
                             f"p_adj={od['class_mix']['p_adjusted']:.2g}; confidence KS={od['confidence']['ks']})",
                             {**context, **od}))
    dq = h["data_quality"]
    if on.get("data_quality", True) and dq["flagged"]:
        first = dq["issues"][0]
        out.append(Condition("data_quality", scope,
                             f"{where}: {len(dq['issues'])} data-quality issue(s); {first['signal']} "
                             f"{_pct(first['rate'])} on {first['feature'] or 'requests'} (max {_pct(first['max'])})",
                             {**context, "issues": dq["issues"], "schema_errors": dq["schema_errors"],
                              "requests": dq["requests"]}))
    acc, ar = h["accuracy"], rules.accuracy_drop
    if on.get("accuracy_drop", True) and acc["reference"] is not None:
        measured = acc["measured"]
        value, how = None, ""
        if measured and measured["labels"] >= ar.min_labels:
            value, how = measured["accuracy"], f"measured on {measured['labels']} labels"
        elif acc["estimated"] is not None and acc["trustworthy"] and h["count"] >= ar.min_count:
            value, how = acc["estimated"], f"estimated without labels from {h['count']} predictions"
        if value is not None and acc["reference"] - value > ar.max_drop:
            out.append(Condition("accuracy_drop", scope,
                                 f"{where}: accuracy {_pct(value)} ({how}) vs {_pct(acc['reference'])} at packaging",
                                 {**context, "accuracy": value, "how": how, "reference": acc["reference"],
                                  "reference_source": acc["reference_source"], "max_drop": ar.max_drop,
                                  "measured": measured, "estimated": acc["estimated"],
                                  "empty_bin_share": acc["empty_bin_share"]}))
    ops, er = h["operations"], rules.error_rate
    if on.get("error_rate", True) and h["requests"] >= er.min_requests and ops["error_rate"] > er.max_rate:
        out.append(Condition("error_rate", scope,
                             f"{where}: error rate {_pct(ops['error_rate'])} (max {_pct(er.max_rate)})",
                             {**context, "error_rate": ops["error_rate"], "errors": ops["errors"],
                              "max_rate": er.max_rate}))
    lr, p95 = rules.latency_p95, ops["latency_ms"]["p95"]
    if on.get("latency_p95", True) and h["count"] >= lr.min_count and p95 is not None and p95 > lr.max_p95_ms:
        out.append(Condition("latency_p95", scope, f"{where}: p95 latency {p95:.1f} ms (max {lr.max_p95_ms:g} ms)",
                             {**context, "latency_ms": ops["latency_ms"], "max_p95_ms": lr.max_p95_ms}))
    return out


def scopes(agg: Aggregate, rules: AlertRules, enrolled: dict[str, dict[str, str]] | None = None
           ) -> list[tuple[str, list[str]]]:
    """Fleet-wide, then each tagged cohort (tag=value) of the reporting devices that is a proper subset of
    the fleet: of the devices reporting, or, when every reporting device is in it (only that cohort has
    reported so far), of the ``enrolled`` devices (device -> tags). Without the second test, which scopes are
    judged would depend on whose summaries arrived first, and a shift in one site could page as "fleet"."""
    everyone = sorted(agg.devices)
    out = [("fleet", everyone)]
    for tag in rules.cohort_tags if rules.cohort_tags is not None else agg.tag_keys():
        for value, members in agg.cohorts(tag).items():
            if value == UNTAGGED:
                continue
            proper = len(members) < len(everyone)
            if not proper and enrolled:
                proper = sum(t.get(tag) == value for t in enrolled.values()) < len(enrolled)
            if proper:
                out.append((f"{tag}={value}", members))
    return out


def group_conditions(found: list[tuple[str, Condition]]) -> list[tuple[str, Condition]]:
    """One page per (version, kind), not one per scope: a shift in one site also shows in the fleet and in every
    cohort that shares devices with it, and paging for each would teach on-call to ignore the pager.

    The headline is where the cause most likely is: a tag cohort before the fleet; among cohorts, one that
    *isolates* the condition (no other value of its tag meets it: site north drifts, south and east do not)
    before one that does not (hardware rpi4 and rpi5 both hold a north device, so both drift); then the
    fewest devices. Every affected scope is listed in the evidence (``scopes``). The dedup key uses the fixed
    scope ``grouped``, so a change of headline between evaluations refreshes the same alert.
    """
    by: dict[tuple[str, str], list[Condition]] = {}
    for version, cond in found:
        by.setdefault((version, cond.kind), []).append(cond)
    out: list[tuple[str, Condition]] = []
    for (version, kind), conds in by.items():
        tags = [c.scope.split("=", 1)[0] for c in conds if c.scope != "fleet"]

        def isolates(c: Condition, tags: list[str] = tags) -> bool:
            return c.scope != "fleet" and tags.count(c.scope.split("=", 1)[0]) == 1

        conds.sort(key=lambda c: (c.scope == "fleet", not isolates(c), c.evidence.get("device_count", 0) or 0,
                                  c.scope))
        head = conds[0]
        others = [c.scope for c in conds[1:]]
        evidence = {**head.evidence, "scope": head.scope,
                    "scopes": [{"scope": c.scope, "summary": c.summary, "devices": c.evidence.get("device_count")}
                               for c in conds]}
        summary = head.summary + (f" (also seen in: {', '.join(others)})" if others else "")
        out.append((version, Condition(kind, GROUPED, summary, evidence)))
    return out
