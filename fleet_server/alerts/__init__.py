"""Alerts: rules over the health signals, one open alert per condition, delivered to the owner's on-call route.

Modules, in the order an alert lives:

- ``rules``: the rules (defaults, overridable per model in ``models.alert_rules`` JSON, validated by
  :func:`parse_rules`): input drift, output drift, data quality, accuracy drop, error rate, p95 latency.
- ``conditions`` (pure): which rules one scope's health (:func:`fleet_server.health.assess`) meets, and one
  page per version and kind across scopes.
- ``evaluation``: :func:`evaluate` runs every model's rules over its recent summaries, fleet-wide and per
  cohort; one alert per persisting condition (dedup key ``model|version|kind|grouped``); auto-resolution.
- ``lifecycle``: the ``alerts`` table: opened or refreshed (:func:`raise_alert`), acknowledged, resolved by
  hand, listed.
- ``delivery``: :func:`deliver_due` POSTs pending alerts to ``models.oncall`` with retries and backoff.

**Resolution** (decided): automatic once the condition has been clear for ``resolve_after_s`` (default 1 h)
of consecutive evaluations — a version that stops reporting counts as clear — or by hand (API/CLI). Set
``resolve_after_s`` to null for hand-only resolution. After a resolution by hand the same condition does not
open a new alert for ``cooldown_s`` (default 1 h): the operator said it is dealt with. Acknowledging keeps an
alert open (deduplicated, still auto-resolving) and stops nothing but further attention.

Everything public is re-exported here; import from ``fleet_server.alerts``.
"""

from ..health import DataQualityPolicy, InputDriftPolicy, OutputDriftPolicy, TrustPolicy
from .conditions import GROUPED, Condition, conditions, group_conditions, scopes
from .delivery import DeliveryConfig, deliver_due, next_delivery_at, payload
from .evaluation import MAX_EVIDENCE_DEVICES, Evaluation, evaluate
from .lifecycle import (
    ACTIVE,
    DELIVERY_STATES,
    STATES,
    acknowledge,
    alert_doc,
    counts_by_state,
    dedup_key,
    get_alert,
    list_alerts,
    raise_alert,
    record_event,
    resolve,
)
from .rules import (
    KINDS,
    SEVERITY,
    AccuracyRule,
    AlertRules,
    ErrorRateRule,
    LatencyRule,
    parse_rules,
    rules_for,
    set_rules,
)

__all__ = [
    "ACTIVE",
    "DELIVERY_STATES",
    "GROUPED",
    "KINDS",
    "MAX_EVIDENCE_DEVICES",
    "SEVERITY",
    "STATES",
    "AccuracyRule",
    "AlertRules",
    "Condition",
    "DataQualityPolicy",
    "DeliveryConfig",
    "ErrorRateRule",
    "Evaluation",
    "InputDriftPolicy",
    "LatencyRule",
    "OutputDriftPolicy",
    "TrustPolicy",
    "acknowledge",
    "alert_doc",
    "conditions",
    "counts_by_state",
    "dedup_key",
    "deliver_due",
    "evaluate",
    "get_alert",
    "group_conditions",
    "list_alerts",
    "next_delivery_at",
    "parse_rules",
    "payload",
    "raise_alert",
    "record_event",
    "resolve",
    "rules_for",
    "scopes",
    "set_rules",
]
