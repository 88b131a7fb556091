"""Two-sample Kolmogorov–Smirnov on binned counts.

The statistic is the largest absolute difference between the two empirical CDFs, read at the bin edges (the
only points both histograms know). Reading it at a subset of points can only lower it, so the test stays
conservative on binned data. The p-value uses the Kolmogorov limiting distribution with the effective sample
size ``n_e = n·m / (n + m)`` of the two samples (reference ``n``, current ``m``) and Stephens' small-sample
correction ``(√n_e + 0.12 + 0.11/√n_e)·D``. The reference size matters as much as the window size: with a
reference of ``n`` rows, ``n_e < n`` however many rows the windows hold, which bounds the power.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import kstwobign

from .registry import Statistic


def p_value(d: np.ndarray, n: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The p-value of KS statistics ``d`` for samples of ``n`` and ``m`` values (1 where either is empty)."""
    ok = (n > 0) & (m > 0)
    ne = np.where(ok, n * m / np.where(ok, n + m, 1.0), 0.0)
    root = np.sqrt(ne)
    lam = np.where(ok, (root + 0.12 + 0.11 / np.where(ok, root, 1.0)) * d, 0.0)
    return np.clip(np.where(ok, kstwobign.sf(lam), 1.0), 0.0, 1.0)


def _ks(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = ref.sum(axis=1)
    m = cur.sum(axis=1)
    ok = (n > 0) & (m > 0)
    safe_n = np.where(ok, n, 1.0)[:, None]
    safe_m = np.where(ok, m, 1.0)[:, None]
    d = np.abs(np.cumsum(ref, axis=1) / safe_n - np.cumsum(cur, axis=1) / safe_m).max(axis=1)
    d = np.where(ok, d, 0.0)
    return d, p_value(d, n, m), d


KS = Statistic(
    name="ks",
    description="two-sample Kolmogorov-Smirnov on binned counts: max |ECDF difference| over the bin edges; "
                "p-value from the Kolmogorov distribution with effective n = n*m/(n+m)",
    feature_types=("numerical",),
    default_threshold=0.05,
    threshold_kind="p_value",
    fn=_ks,
)
