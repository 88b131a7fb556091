"""Two-sample chi-square test of homogeneity on category counts (output classes, categorical features).

The reference and current counts form a 2 × K table; the test asks whether both rows come from the same
category mix, so the reference's own sample size counts (a one-sample goodness-of-fit test would treat the
reference shares as exact). Categories whose expected count is below 5 in either row are pooled into one
(smallest first) so the chi-square approximation holds; with fewer than two categories left there is nothing
to test (statistic 0, p = 1). Effect size: Cramér's V, ``sqrt(χ² / N)`` for a 2-row table, in [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2

from .registry import Statistic

MIN_EXPECTED = 5.0


def pooled_table(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """The 2 × K' table after pooling categories with an expected count below ``MIN_EXPECTED``."""
    table = np.vstack([ref, cur]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    total = table.sum()
    if total == 0 or table.shape[1] < 2:
        return table
    min_share = table.sum(axis=1).min() / total
    small = table.sum(axis=0) * min_share < MIN_EXPECTED
    if not small.any():
        return table
    pooled = table[:, small].sum(axis=1)
    rest = table[:, ~small]
    if rest.shape[1] == 0 or pooled.sum() * min_share >= MIN_EXPECTED:
        return np.column_stack([rest, pooled])
    # the pooled bucket is still too small on its own: fold it into the smallest remaining category
    j = int(np.argmin(rest.sum(axis=0)))
    rest = rest.copy()
    rest[:, j] += pooled
    return rest


def _one(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float, float]:
    if ref.sum() == 0 or cur.sum() == 0:
        return 0.0, 1.0, 0.0
    t = pooled_table(ref, cur)
    if t.shape[1] < 2:
        return 0.0, 1.0, 0.0
    total = t.sum()
    expected = np.outer(t.sum(axis=1), t.sum(axis=0)) / total
    stat = float(((t - expected) ** 2 / expected).sum())
    p = float(chi2.sf(stat, t.shape[1] - 1))
    return stat, p, float(np.sqrt(stat / total))


def _chi_square(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [_one(r, c) for r, c in zip(ref, cur, strict=True)]
    out = np.asarray(rows, dtype=np.float64).reshape(len(rows), 3)
    return out[:, 0], out[:, 1], out[:, 2]


CHI_SQUARE = Statistic(
    name="chi_square",
    description="two-sample chi-square test of homogeneity (2 x K table, categories with expected count < 5 "
                "pooled); effect size Cramer's V",
    feature_types=("categorical",),
    default_threshold=0.05,
    threshold_kind="p_value",
    fn=_chi_square,
)
