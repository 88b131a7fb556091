"""Reference bin edges (``quantile_edges``, used by the packager's profile) and the agent's ``Binner`` on them:
every value of a discrete feature gets a bin of its own, so a change in how often a level occurs is a change in
the counts the server compares."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.binning import Binner, quantile_edges
from fleet_server.drift import get_statistic


def counts(edges: list[float], x: list[float] | np.ndarray) -> list[int]:
    """Bin counts of ``x`` through both of the Binner's search paths (small batches and large ones)."""
    b = Binner([edges])
    col = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    whole = np.zeros(b.total, dtype=np.int64)
    b.add(col, whole)
    piecewise = np.zeros(b.total, dtype=np.int64)
    for i in range(0, len(col), 5):
        b.add(col[i:i + 5], piecewise)
    assert whole.tolist() == piecewise.tolist()
    return whole.tolist()


def test_a_flag_gets_one_bin_per_value_and_its_shift_is_flagged() -> None:
    edges = quantile_edges(np.array([0.0, 1.0] * 1000))
    assert edges == [0.0, 0.5, 1.0]
    assert counts(edges, [0.0] * 10 + [1.0] * 5) == [0, 10, 5, 0]  # underflow, 0, 1, overflow
    reference = counts(edges, [0.0, 1.0] * 1000)
    window = counts(edges, [0.0] * 2000)  # half ones -> no ones
    r = get_statistic("ks").compute(reference, window)
    assert r.drifted and r.statistic == pytest.approx(0.5)


def test_a_coded_category_keeps_its_top_two_levels_apart() -> None:
    edges = quantile_edges(np.array([0.0] * 600 + [1.0] * 300 + [2.0] * 100))
    assert counts(edges, [0, 1, 1, 2, 2, 2]) == [0, 1, 2, 3, 0]
    moved = counts(edges, [0.0] * 600 + [2.0] * 400)  # level 1 -> level 2
    assert get_statistic("ks").compute(counts(edges, [0.0] * 600 + [1.0] * 300 + [2.0] * 100), moved).drifted


def test_a_constant_feature_sees_values_below_and_above_it() -> None:
    edges = quantile_edges(np.array([5.0] * 100))
    assert counts(edges, [5.0, 5.0, 4.0, 6.0]) == [1, 2, 1]  # below, at, above


def test_continuous_features_keep_quantile_edges_and_nan_is_not_a_level() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)
    assert len(quantile_edges(x)) == 21
    assert quantile_edges(np.arange(21.0)) == [float(e) for e in np.quantile(np.arange(21.0), np.linspace(0, 1, 21))]
    assert quantile_edges(np.array([0.0, 1.0, np.nan, np.inf])) == [0.0, 0.5, 1.0]
    assert quantile_edges(np.array([np.nan])) == [0.0]


def test_levels_near_the_largest_float_give_finite_edges() -> None:
    huge = np.finfo(np.float64).max
    assert quantile_edges(np.array([1e308, 1.7e308])) == [1e308, 1.35e308, 1.7e308]  # (a + b) / 2 would overflow
    assert quantile_edges(np.array([huge] * 3)) == [huge]  # no float above it
