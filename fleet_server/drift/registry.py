"""The drift statistics by name, the value object they share, and the multiple-testing corrections.

Every statistic is a :class:`Statistic`: a small frozen value (name, description, feature types, default
threshold, and a vectorised function over binned counts) defined in its own module. This module lists them
explicitly — nothing registers itself by being imported — and looks them up by name with an error that lists
the choices. Statistics work on *counts on shared bins* (the reference profile's bins, which every device
summary uses too), never on raw values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import RequestError

FeatureType = Literal["numerical", "categorical"]
ThresholdKind = Literal["p_value", "distance"]
# (ref [R, K], cur [R, K]) -> (statistic [R], p-value [R] or None, effect size [R])
BatchFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None, np.ndarray]]


class UnknownStatisticError(RequestError):
    """A statistic or correction name that is not one of the choices (the message lists them)."""


@dataclass(frozen=True)
class StatResult:
    """One comparison: the statistic's value, its p-value (None for distances), the verdict against the
    threshold, and an effect size on a scale that does not grow with the sample size."""

    statistic: float
    p_value: float | None
    drifted: bool
    effect: float


@dataclass(frozen=True)
class StatBatch:
    """Many comparisons at once (one row per feature or scope), as arrays."""

    statistic: np.ndarray
    p_value: np.ndarray | None
    drifted: np.ndarray
    effect: np.ndarray

    def row(self, i: int) -> StatResult:
        p = None if self.p_value is None else float(self.p_value[i])
        return StatResult(float(self.statistic[i]), p, bool(self.drifted[i]), float(self.effect[i]))


@dataclass(frozen=True)
class Statistic:
    """A drift statistic on binned counts.

    ``threshold_kind`` says how ``default_threshold`` is read: ``p_value`` — drifted when p < threshold;
    ``distance`` — drifted when statistic >= threshold.
    """

    name: str
    description: str
    feature_types: tuple[FeatureType, ...]
    default_threshold: float
    threshold_kind: ThresholdKind
    fn: BatchFn

    def compute(self, ref_counts: object, cur_counts: object, threshold: float | None = None) -> StatResult:
        """Compare one reference histogram with one current histogram (same bins, same length).

        Raises RequestError when the shapes differ or a count is negative."""
        ref = np.asarray(ref_counts, dtype=np.float64)
        cur = np.asarray(cur_counts, dtype=np.float64)
        if ref.ndim != 1 or cur.ndim != 1:
            raise RequestError(f"{self.name}: compute() takes two 1-D count vectors; use compute_many() for 2-D")
        return self.compute_many(ref[None, :], cur[None, :], threshold).row(0)

    def compute_many(self, ref_counts: object, cur_counts: object, threshold: float | None = None, *,
                     allow_negative: bool = False) -> StatBatch:
        """Row-wise comparisons of ``[R, K]`` count matrices (pad shorter histograms with trailing zeros).

        ``allow_negative``: the current counts may be noised sums (signed); only for a statistic whose function
        reads cumulative sums (KS), which noise leaves unbiased.
        Raises RequestError when the shapes differ or a count is negative (and not allowed)."""
        ref = np.atleast_2d(np.asarray(ref_counts, dtype=np.float64))
        cur = np.atleast_2d(np.asarray(cur_counts, dtype=np.float64))
        if ref.shape != cur.shape:
            raise RequestError(f"{self.name}: reference bins {ref.shape} and current bins {cur.shape} differ; "
                               "both must be counts on the reference profile's bins")
        if (ref < 0).any() or (not allow_negative and (cur < 0).any()):
            raise RequestError(f"{self.name}: counts must be non-negative")
        stat, p, effect = self.fn(ref, cur)
        t = self.default_threshold if threshold is None else threshold
        if self.threshold_kind == "p_value":
            assert p is not None
            drifted = p < t
        else:
            drifted = stat >= t
        return StatBatch(stat, p, np.asarray(drifted, dtype=bool), effect)


def statistics() -> dict[str, Statistic]:
    """Every statistic by name (an explicit list: adding one means adding it here)."""
    from .chi_square import CHI_SQUARE
    from .jensen_shannon import JENSEN_SHANNON
    from .ks import KS
    from .psi import PSI

    return {s.name: s for s in (KS, PSI, JENSEN_SHANNON, CHI_SQUARE)}


def get_statistic(name: str) -> Statistic:
    """Look a statistic up by name. Raises UnknownStatisticError listing the choices."""
    table = statistics()
    try:
        return table[name]
    except KeyError:
        choices = ", ".join(f"{s.name} ({'/'.join(s.feature_types)})" for s in table.values())
        raise UnknownStatisticError(f"unknown drift statistic {name!r}; choices: {choices}") from None


# ---- multiple-testing corrections (family-wise error rate across features) -----------------------------

def bonferroni(p: np.ndarray) -> np.ndarray:
    """Adjusted p-values: p * m, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    return np.minimum(p * p.size, 1.0)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values: same family-wise guarantee as Bonferroni, never less powerful."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


CORRECTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"holm": holm, "bonferroni": bonferroni}


def correct(p_values: np.ndarray, method: str) -> np.ndarray:
    """Adjust a family of p-values. Raises UnknownStatisticError listing the corrections."""
    try:
        fn = CORRECTIONS[method]
    except KeyError:
        raise UnknownStatisticError(f"unknown correction {method!r}; choices: {', '.join(CORRECTIONS)}") from None
    return fn(p_values)
