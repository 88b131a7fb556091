"""The health policies: thresholds of the signals (defaults; overridable per model through ``models.alert_rules``,
see :mod:`fleet_server.alerts`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..drift.registry import Statistic, get_statistic
from ..errors import RequestError


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
    # ... and the same for any one feature: higher, as one feature's tails beyond a small reference's range hold
    # a few percent of its values by chance (5 % for the worst of 30 against the 114-row clinical reference)
    max_feature_empty_share: float = 0.25


@dataclass(frozen=True)
class HealthPolicy:
    input_drift: InputDriftPolicy = field(default_factory=InputDriftPolicy)
    output_drift: OutputDriftPolicy = field(default_factory=OutputDriftPolicy)
    data_quality: DataQualityPolicy = field(default_factory=DataQualityPolicy)
    trust: TrustPolicy = field(default_factory=TrustPolicy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

