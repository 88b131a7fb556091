"""Vectorised histogram binning on a package's reference bin edges (shared by packager and agent).

For a feature with edges ``e_0 < … < e_{k-1}`` there are ``k + 1`` counts: index 0 is underflow (``x < e_0``),
index ``i`` (1 ≤ i ≤ k-1) is the inner bin ``[e_{i-1}, e_i)`` — the last inner bin is closed, so the maximum
seen in the reference lands inside — and index ``k`` is overflow (``x > e_{k-1}``). NaN is not binned: callers
count it separately. The same rule is used to build the reference profile and every on-device window, so the
server compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class Binner:
    """Precomputed edges for F features; ``add(x, counts)`` accumulates a batch ``[N, F]`` into flat counts."""

    def __init__(self, edges: Sequence[Sequence[float]]) -> None:
        self.n_features = len(edges)
        self.sizes = np.array([len(e) + 1 for e in edges], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.total = int(self.sizes.sum())
        width = max((len(e) for e in edges), default=0)
        self.padded = np.full((self.n_features, width), np.inf, dtype=np.float64)
        self.last = np.empty(self.n_features, dtype=np.float64)
        self.last_index = np.empty(self.n_features, dtype=np.int64)
        self._edges = [np.asarray(e, dtype=np.float64) for e in edges]
        for i, e in enumerate(self._edges):
            self.padded[i, : len(e)] = e
            self.last[i] = e[-1]
            self.last_index[i] = len(e) - 1
        self._global_search()

    def _global_search(self) -> None:
        """One ``searchsorted`` for all features: feature j's values and edges are shifted by an offset that
        puts every feature in its own disjoint stretch of the real line. Values are assumed finite and within
        ``[lo_j, hi_j]`` (validated rows); ``set_domain`` widens the stretches to the validated ranges. The
        last edge is nudged up by one ulp so a value equal to it lands in the last inner bin."""
        self._lo = np.array([e[0] for e in self._edges], dtype=np.float64)
        self._hi = np.array([e[-1] for e in self._edges], dtype=np.float64)
        self._rebuild_offsets()

    def set_domain(self, lows: np.ndarray, highs: np.ndarray) -> None:
        self._lo = np.minimum(self._lo, np.asarray(lows, dtype=np.float64))
        self._hi = np.maximum(self._hi, np.asarray(highs, dtype=np.float64))
        self._rebuild_offsets()

    def _rebuild_offsets(self) -> None:
        span = (self._hi - self._lo) + 1.0
        start = np.concatenate([[0.0], np.cumsum(span)[:-1] + np.arange(1, self.n_features) * 1.0])
        self._shift = start - self._lo  # value + shift lands in [start, start + span)
        flat, begin = [], []
        for j, e in enumerate(self._edges):
            begin.append(sum(len(x) for x in self._edges[:j]))
            sh = e + self._shift[j]
            sh[-1] = np.nextafter(sh[-1], np.inf)
            flat.append(sh)
        self._flat = np.concatenate(flat) if flat else np.zeros(0)
        self._begin = np.asarray(begin, dtype=np.int64)

    def indices_fast(self, x: np.ndarray) -> np.ndarray:
        """Like :meth:`indices` for finite values inside the domain (validated rows), in one search."""
        return np.searchsorted(self._flat, x + self._shift, side="right") - self._begin

    def indices(self, x: np.ndarray) -> np.ndarray:
        """Bin index per value, ``[N, F]`` int64 (NaN maps to 0; mask it out with ``np.isnan``)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] <= 8:
            idx = (x[:, :, None] >= self.padded[None, :, :]).sum(axis=2)
        else:
            idx = np.empty(x.shape, dtype=np.int64)
            for j, e in enumerate(self._edges):
                idx[:, j] = np.searchsorted(e, x[:, j], side="right")
        return np.where(x == self.last[None, :], self.last_index[None, :], idx)

    def add(self, x: np.ndarray, counts: np.ndarray) -> None:
        """Add the batch's bin counts into ``counts`` (flat, length ``self.total``); NaN values are skipped."""
        x = np.asarray(x, dtype=np.float64)
        flat = self.indices(x) + self.offsets[None, :]
        ok = ~np.isnan(x)
        counts += np.bincount(flat[ok], minlength=self.total)

    def split(self, counts: np.ndarray) -> list[list[int]]:
        return [counts[o : o + s].astype(int).tolist() for o, s in zip(self.offsets, self.sizes, strict=True)]


def quantile_edges(values: np.ndarray, bins: int = 20) -> list[float]:
    """Reference edges at the data's quantiles, or, for a feature with at most ``bins`` distinct values (a flag,
    a coded category, a count, a constant), one bin per value.

    Quantile edges of a discrete feature collapse onto its values, and since the last inner bin is closed, the
    top two values would share one bin: a flag going from half ones to no ones would change no count. So such a
    feature gets edges at its smallest value, the midpoints between consecutive values and its largest value
    (``[0, 0.5, 1]`` for a 0/1 flag: 0 and 1 each in a bin of its own), and a constant ``c`` gets ``[c, c⁺]``
    (the next float up), so values below it underflow and values above it overflow. Packages built before
    2026-11-28 keep the edges they were built with (the agent bins on the package's edges)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [0.0]
    levels = np.unique(v)
    if levels.size == 1:
        c = float(levels[0])
        up = math.nextafter(c, math.inf)
        return [c, up] if math.isfinite(up) else [c]
    if levels.size <= bins:
        mids = levels[:-1] + (levels[1:] - levels[:-1]) / 2.0  # no overflow near the largest float
        return [float(levels[0]), *(float(m) for m in mids), float(levels[-1])]
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    return [float(e) for e in edges]


def fixed_edges(lo: float, hi: float, bins: int) -> list[float]:
    return [float(e) for e in np.linspace(lo, hi, bins + 1)]
