"""Probation: is the version that was just activated healthy on this device? A pure decision and a small watch.

For ``seconds`` or ``predictions`` (whichever comes first) the new version serves while the watch reads its
per-version counters from the agent. The decision (``decide``) looks at:

* the smoke test: the active slot must still hold its passed ``.smoke.json`` (a slot damaged or replaced
  under the watch fails it);
* the error rate: inference errors / attempts (successful predictions + inference errors). Input-validation
  rejections are the caller's fault and never count. It fails as soon as at least ``min_samples`` attempts were
  seen and the rate is over ``max_error_rate`` (no need to wait out a version that errors), else at the end;
* the p95 latency against the previous version's p95, measured by the same agent on this device before the
  switch (the *baseline*: taken when the download completed, before verifying, unpacking and smoke-testing load
  the device and would inflate it). It fails when the ratio is over ``latency_ratio`` *and* the p95 grew by more
  than ``latency_floor_ms``: below that floor a ratio is scheduling noise, not a regression (a 0.07 ms model
  measured at 0.28 ms on a busy CPU is "4x" and harmless). Judged at the end of the watch; when either side has
  fewer than ``min_samples`` latencies (default 100: the p95 of 20 predictions is about their maximum) the
  comparison is skipped and the verdict says so (an idle device still commits: no traffic is no evidence of
  harm, and the smoke test passed). This device-level check is for gross regressions; a before/after comparison
  on one device is confounded by load changes, and the fleet's comparison against its control group is the finer
  latency gate;
* the agent must actually serve the new version (a model that passed its smoke test but that the agent
  cannot load fails as ``probation_not_serving`` at the end).

Reasons (tokens) are ``probation_passed``, ``probation_errors``, ``probation_latency``, ``probation_smoke``,
``probation_not_serving``; messages start with ``probation:`` and carry the numbers, e.g.
``probation: p95 latency 3.1x the previous version (0.52 ms vs 0.17 ms, limit 2.0x)``.

Nothing here touches files, sockets or the clock: ``ProbationWatch`` is given a reader of the agent's
counters and a monotonic clock, so the decision is tested on plain numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import AgentError

__all__ = ["Baseline", "Observed", "ProbationConfigError", "ProbationPolicy", "ProbationWatch", "StatsSnapshot",
           "Verdict", "decide", "p95"]


class ProbationConfigError(AgentError):
    """A probation parameter is out of range (the message names it)."""

    reason = "config"


MIN_LATENCY_SAMPLES = 100  # latencies needed on each side before the p95s are compared


@dataclass(frozen=True)
class ProbationPolicy:
    """How long to watch and what fails a version. Built from config (``from_config``) or passed by tests."""

    seconds: float = 600.0
    predictions: int = 200
    max_error_rate: float = 0.05
    latency_ratio: float = 2.0
    latency_floor_ms: float = 0.5  # a p95 increase smaller than this never fails probation
    min_samples: int = MIN_LATENCY_SAMPLES  # fewer latencies on either side: latency not compared (p95 of 20 ~ max)
    max_resumes: int = 2  # the agent restarted more often than this during probation: roll back

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ProbationConfigError("probation seconds must be positive")
        if self.predictions < 1:
            raise ProbationConfigError("probation predictions must be at least 1")
        if not 0 <= self.max_error_rate < 1:
            raise ProbationConfigError("probation max_error_rate must be in [0, 1)")
        if not self.latency_ratio >= 1:
            raise ProbationConfigError("probation latency_ratio must be at least 1.0")
        if not self.latency_floor_ms >= 0:
            raise ProbationConfigError("probation latency_floor_ms must be 0 or more")
        if self.min_samples < 1 or self.max_resumes < 0:
            raise ProbationConfigError("probation min_samples must be >= 1 and max_resumes >= 0")

    @classmethod
    def from_config(cls, cfg: Any) -> ProbationPolicy:
        """From a DeviceConfig: ``probation_seconds`` and ``probation_predictions``, and, once config.toml has
        them, ``probation_max_error_rate``, ``probation_latency_ratio`` and ``probation_latency_floor_ms``."""
        return cls(seconds=float(cfg.probation_seconds), predictions=int(cfg.probation_predictions),
                   max_error_rate=float(getattr(cfg, "probation_max_error_rate", cls.max_error_rate)),
                   latency_ratio=float(getattr(cfg, "probation_latency_ratio", cls.latency_ratio)),
                   latency_floor_ms=float(getattr(cfg, "probation_latency_floor_ms", cls.latency_floor_ms)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], default: ProbationPolicy | None = None) -> ProbationPolicy:
        """The policy persisted with a candidate; fields missing there come from ``default``."""
        base = asdict(default or cls())
        known = {k: d[k] for k in base if k in d}
        return cls(**{**base, **known})


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])


@dataclass(frozen=True)
class Baseline:
    """The previous version's latency on this device, measured by the agent just before the switch."""

    version: str
    p95_ms: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Baseline | None:
        if not isinstance(d, dict):
            return None
        try:
            return cls(str(d["version"]), float(d["p95_ms"]), int(d["samples"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class StatsSnapshot:
    """A version's counters as the agent keeps them: successful predictions, inference errors, how many
    latencies were ever recorded, and the most recent ones (milliseconds, oldest first)."""

    predictions: int = 0
    errors: int = 0
    seen: int = 0
    latencies_ms: tuple[float, ...] = ()

    def since(self, start: StatsSnapshot) -> StatsSnapshot:
        """What happened after ``start`` (latencies: the newer ones still held)."""
        new = max(0, self.seen - start.seen)
        lat = self.latencies_ms[len(self.latencies_ms) - min(new, len(self.latencies_ms)):] if new else ()
        return StatsSnapshot(self.predictions - start.predictions, self.errors - start.errors, new, tuple(lat))


@dataclass(frozen=True)
class Observed:
    """What the watch saw of the new version so far."""

    predictions: int
    errors: int
    latencies_ms: Sequence[float]
    elapsed: float
    serving: bool = True
    smoke_passed: bool = True


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["watch", "pass", "fail"]
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def decide(policy: ProbationPolicy, seen: Observed, baseline: Baseline | None) -> Verdict:
    """The probation decision on plain numbers (see the module docstring)."""
    attempts = seen.predictions + seen.errors
    rate = seen.errors / attempts if attempts else 0.0
    new_p95 = p95(seen.latencies_ms)
    details: dict[str, Any] = {"predictions": seen.predictions, "errors": seen.errors, "error_rate": rate,
                               "p95_ms": None if math.isnan(new_p95) else new_p95, "elapsed_s": seen.elapsed,
                               "baseline": None if baseline is None else baseline.to_dict()}
    if not seen.smoke_passed:
        return Verdict("fail", "probation_smoke", "probation: the active slot no longer holds a passed smoke test",
                       details)
    errors_bad = attempts > 0 and rate > policy.max_error_rate
    if errors_bad and attempts >= policy.min_samples:
        return Verdict("fail", "probation_errors", _error_message(rate, seen.errors, attempts, policy), details)
    done = seen.elapsed >= policy.seconds or attempts >= policy.predictions
    if not done:
        return Verdict("watch", "probation", "probation: watching", details)
    if errors_bad:
        return Verdict("fail", "probation_errors", _error_message(rate, seen.errors, attempts, policy), details)
    if not seen.serving and attempts == 0:
        return Verdict("fail", "probation_not_serving", f"probation: the agent did not serve the new version within "
                       f"{seen.elapsed:.0f} s", details)
    n_new = len(seen.latencies_ms)
    if baseline is None or baseline.samples < policy.min_samples or n_new < policy.min_samples \
            or not baseline.p95_ms > 0:
        have = 0 if baseline is None else baseline.samples
        latency = (f"latency not compared (needs {policy.min_samples} predictions on each side; previous version "
                   f"{have}, this one {n_new})")
    else:
        ratio = new_p95 / baseline.p95_ms
        grew = new_p95 - baseline.p95_ms
        details["latency_ratio"] = ratio
        if ratio > policy.latency_ratio and grew > policy.latency_floor_ms:
            shown = f"{ratio:.1f}" if round(ratio, 1) > policy.latency_ratio else f"{ratio:.3f}"
            return Verdict("fail", "probation_latency", f"probation: p95 latency {shown}x the previous version "
                           f"({new_p95:.3g} ms vs {baseline.p95_ms:.3g} ms for {baseline.version}, limit "
                           f"{policy.latency_ratio:.1f}x)", details)
        latency = f"p95 {new_p95:.3g} ms, {ratio:.2f}x the previous version"
        if ratio > policy.latency_ratio:
            latency += f" (but only {grew:+.3g} ms, under the {policy.latency_floor_ms:g} ms floor)"
    traffic = "no traffic" if attempts == 0 else f"{seen.predictions} predictions, {seen.errors} errors"
    return Verdict("pass", "probation_passed", f"probation passed after {seen.elapsed:.0f} s: {traffic}; {latency}",
                   details)


def _error_message(rate: float, errors: int, attempts: int, policy: ProbationPolicy) -> str:
    return (f"probation: error rate {rate:.2f} ({errors} inference errors in {attempts} predictions, limit "
            f"{policy.max_error_rate:.2f})")


class ProbationWatch:
    """Feeds ``decide`` with the agent's counters for one version, counted from when the watch starts.

    ``read()`` returns the version's StatsSnapshot, ``serving()`` whether the agent serves it, ``smoke()``
    whether its slot still holds a passed smoke test; ``clock`` is monotonic seconds.
    """

    def __init__(self, policy: ProbationPolicy, baseline: Baseline | None, read: Callable[[], StatsSnapshot], *,
                 serving: Callable[[], bool] = lambda: True, smoke: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.baseline = baseline
        self._read = read
        self._serving = serving
        self._smoke = smoke
        self._clock = clock
        self._t0 = clock()
        self._start = read()

    def poll(self) -> Verdict:
        d = self._read().since(self._start)
        seen = Observed(d.predictions, d.errors, d.latencies_ms, self._clock() - self._t0, self._serving(),
                        self._smoke())
        return decide(self.policy, seen, self.baseline)
