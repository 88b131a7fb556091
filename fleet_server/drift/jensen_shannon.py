"""Jensen–Shannon distance on binned counts.

The square root of the Jensen–Shannon divergence (base 2) between the reference and current bin shares: a
symmetric, bounded metric in [0, 1] that needs no smoothing (empty bins are fine). No p-value.
"""

from __future__ import annotations

import numpy as np

from .registry import Statistic


def _xlogx_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0)), 0.0)


def _js(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, None, np.ndarray]:
    n = ref.sum(axis=1, keepdims=True)
    m = cur.sum(axis=1, keepdims=True)
    ok = ((n > 0) & (m > 0))[:, 0]
    p = ref / np.where(n > 0, n, 1.0)
    q = cur / np.where(m > 0, m, 1.0)
    mid = (p + q) / 2
    div = 0.5 * _xlogx_ratio(p, mid).sum(axis=1) + 0.5 * _xlogx_ratio(q, mid).sum(axis=1)
    dist = np.where(ok, np.sqrt(np.clip(div, 0.0, 1.0)), 0.0)
    return dist, None, dist


JENSEN_SHANNON = Statistic(
    name="jensen_shannon",
    description="Jensen-Shannon distance (sqrt of the base-2 divergence) between bin shares, in [0, 1]",
    feature_types=("numerical", "categorical"),
    default_threshold=0.1,
    threshold_kind="distance",
    fn=_js,
)
