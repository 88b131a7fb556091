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

Modules: ``policy`` (the thresholds, :class:`HealthPolicy`), ``reference`` (:class:`Reference`, what a version
is compared with, and :class:`Layout`), ``aggregate`` (:func:`load_aggregate`, :func:`time_range`), ``signals``
(:func:`assess`, :func:`latency_percentiles`; sample size and power are written down there) and ``report``
(:func:`report`, :func:`latest_version`). Everything public is re-exported here; import from
``fleet_server.health``.

SQL lives only in ``Reference.load``, ``summary_vectors``, ``latest_version`` and ``report``; ``assess`` and the
signal functions are pure (plain data in, plain data out).
"""

from .aggregate import DEFAULT_LOOKBACK_S, UNTAGGED, Aggregate, fmt_epoch, load_aggregate, summary_vectors, time_range
from .policy import DataQualityPolicy, HealthPolicy, InputDriftPolicy, OutputDriftPolicy, TrustPolicy
from .reference import Layout, Reference
from .report import choose_version, latest_version, report
from .signals import OPERATIONAL_ERRORS, SCHEMA_ERRORS, assess, cohens_w, compact, latency_percentiles

__all__ = [
    "DEFAULT_LOOKBACK_S",
    "OPERATIONAL_ERRORS",
    "SCHEMA_ERRORS",
    "UNTAGGED",
    "Aggregate",
    "DataQualityPolicy",
    "HealthPolicy",
    "InputDriftPolicy",
    "Layout",
    "OutputDriftPolicy",
    "Reference",
    "TrustPolicy",
    "assess",
    "cohens_w",
    "compact",
    "fmt_epoch",
    "latency_percentiles",
    "choose_version",
    "latest_version",
    "load_aggregate",
    "summary_vectors",
    "report",
    "time_range",
]
