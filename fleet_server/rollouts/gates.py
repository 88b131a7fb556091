"""Health gates: may a rollout stage advance? Pure functions over a metrics snapshot.

Every gate yields a GateResult (name, value, threshold, passed, detail) so the decision log shows the evidence.
A gate with too little data does not pass (``insufficient data``) — the stage waits rather than advancing blind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_THRESHOLDS: dict[str, float] = {
    "min_devices": 1,  # devices in the stage reporting the new version with summaries
    "min_predictions": 50,  # predictions by the new version in the stage since the stage started
    "max_install_failure_rate": 0.2,
    "max_error_rate": 0.05,  # inference errors / predictions
    "max_p95_latency_ratio": 2.0,  # new version p95 / control group p95 (histogram bins are 1.33x apart)
    # ... and the p95 must also have grown by more than this to fail: below it a ratio is scheduling noise (a
    # 0.07 ms model seen at 0.2 ms on a busy device is "2.8x" and harmless). The device's probation uses the
    # same floor (``probation_latency_floor_ms``).
    "min_p95_increase_ms": 0.5,
    "max_accuracy_drop": 0.05,  # control estimated accuracy minus new estimated accuracy
}


@dataclass
class GroupStats:
    devices: int = 0
    predictions: int = 0
    errors: int = 0
    p95_ms: float | None = None
    est_accuracy: float | None = None


@dataclass
class Snapshot:
    """What the engine knows about one stage since it started."""

    targeted: int  # devices the stage asked to move
    reporting_new: int  # of those, devices whose reported active version is the new one
    install_failures: int  # of those, devices that reported rejected/failed/rolled_back for the new version
    new: GroupStats = field(default_factory=GroupStats)  # the new version, stage devices
    control: GroupStats = field(default_factory=GroupStats)  # devices still on the previous version


@dataclass
class GateResult:
    name: str
    value: float | None
    threshold: float
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(s: Snapshot, thresholds: dict[str, float]) -> list[GateResult]:
    t = {**DEFAULT_THRESHOLDS, **thresholds}
    out = [
        GateResult("devices_reporting", s.new.devices, t["min_devices"], s.new.devices >= t["min_devices"],
                   f"{s.new.devices} of {s.targeted} devices report the new version with summaries"),
        GateResult("predictions", s.new.predictions, t["min_predictions"], s.new.predictions >= t["min_predictions"],
                   f"{s.new.predictions} predictions by the new version in this stage"),
    ]
    rate = s.install_failures / s.targeted if s.targeted else 0.0
    out.append(GateResult("install_failure_rate", rate, t["max_install_failure_rate"],
                          rate <= t["max_install_failure_rate"],
                          f"{s.install_failures} of {s.targeted} devices failed to install or rolled back"))
    if s.new.predictions:
        er = s.new.errors / s.new.predictions
        out.append(GateResult("error_rate", er, t["max_error_rate"], er <= t["max_error_rate"],
                              f"{s.new.errors} inference errors in {s.new.predictions} predictions"))
    else:
        out.append(GateResult("error_rate", None, t["max_error_rate"], False, "insufficient data"))
    if s.new.p95_ms is not None and s.control.p95_ms:
        ratio = s.new.p95_ms / s.control.p95_ms
        grew = s.new.p95_ms - s.control.p95_ms
        detail = f"p95 {s.new.p95_ms:.3f} ms (new) vs {s.control.p95_ms:.3f} ms (control)"
        within_floor = ratio > t["max_p95_latency_ratio"] and grew <= t["min_p95_increase_ms"]
        if within_floor:
            detail += f"; {grew:.3f} ms more is within the {t['min_p95_increase_ms']:g} ms noise floor"
        out.append(GateResult("p95_latency_ratio", ratio, t["max_p95_latency_ratio"],
                              ratio <= t["max_p95_latency_ratio"] or within_floor, detail))
    elif s.new.p95_ms is not None and s.control.devices == 0:
        out.append(GateResult("p95_latency_ratio", None, t["max_p95_latency_ratio"], True,
                              "no control group left (final stage): gate not applicable"))
    else:
        out.append(GateResult("p95_latency_ratio", None, t["max_p95_latency_ratio"], False, "insufficient data"))
    if s.new.est_accuracy is not None and s.control.est_accuracy is not None:
        drop = s.control.est_accuracy - s.new.est_accuracy
        out.append(GateResult("accuracy_drop", drop, t["max_accuracy_drop"], drop <= t["max_accuracy_drop"],
                              f"estimated accuracy {s.new.est_accuracy:.3f} (new) vs "
                              f"{s.control.est_accuracy:.3f} (control)"))
    return out


def failing(results: list[GateResult]) -> list[GateResult]:
    """Gates that failed on evidence (not merely for lack of data)."""
    return [r for r in results if not r.passed and r.detail != "insufficient data"
            and r.name not in ("devices_reporting", "predictions")]


def waiting(results: list[GateResult]) -> list[GateResult]:
    return [r for r in results if not r.passed and r not in failing(results)]
