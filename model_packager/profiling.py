"""Building the reference profile, the confidence calibration map, feature ranges and golden inputs."""

from __future__ import annotations

import numpy as np

from device_agent.binning import Binner, fixed_edges, quantile_edges
from edgefleet_contracts.manifest import FeatureSpec
from edgefleet_contracts.profile import CalibrationMap, FeatureProfile, Profile

CONFIDENCE_BINS = 20
CALIBRATION_BINS = 10


def reference_profile(
    features: np.ndarray, names: list[str], probabilities: np.ndarray, classes: list[str], bins: int = 20
) -> Profile:
    """Per-feature quantile edges and counts (20 bins plus under/overflow by default) and output histograms."""
    feats = np.asarray(features, dtype=np.float64)
    edges = [quantile_edges(feats[:, j], bins) for j in range(feats.shape[1])]
    binner = Binner(edges)
    counts = np.zeros(binner.total, dtype=np.int64)
    binner.add(feats, counts)
    per_feature = binner.split(counts)
    fps = []
    for j, name in enumerate(names):
        col = feats[:, j]
        ok = col[~np.isnan(col)]
        fps.append(FeatureProfile(name, edges[j], per_feature[j], int(np.isnan(col).sum()),
                                  float(ok.mean()) if ok.size else 0.0, float(ok.std()) if ok.size else 0.0))
    pred = probabilities.argmax(axis=1)
    conf = probabilities.max(axis=1)
    cedges = fixed_edges(0.0, 1.0, CONFIDENCE_BINS)
    ccounts, _ = np.histogram(np.clip(conf, 0.0, 1.0), bins=np.asarray(cedges))
    return Profile(
        n=int(feats.shape[0]), features=fps, classes=list(classes),
        class_counts=np.bincount(pred, minlength=len(classes)).astype(int).tolist(),
        confidence_edges=cedges, confidence_counts=ccounts.astype(int).tolist(),
    )


def _pav(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the weighted least-squares non-decreasing fit."""
    blocks: list[list[float]] = []  # [value, weight, size]
    for v, w in zip(values, weights, strict=True):
        blocks.append([float(v), float(w), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            wt = w1 + w2
            blocks.append([(v1 * w1 + v2 * w2) / wt if wt else (v1 + v2) / 2, wt, n1 + n2])
    out: list[float] = []
    for v, _, n in blocks:
        out.extend([v] * int(n))
    return np.asarray(out)


def calibration_map(probabilities: np.ndarray, y: np.ndarray | None) -> tuple[CalibrationMap, bool]:
    """Fit confidence -> accuracy on labelled holdout data. Without labels, return the identity map and False."""
    edges = fixed_edges(0.0, 1.0, CALIBRATION_BINS)
    centres = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
    conf = np.clip(probabilities.max(axis=1), 0.0, 1.0)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, CALIBRATION_BINS - 1)
    counts = np.bincount(idx, minlength=CALIBRATION_BINS)
    if y is None:
        return CalibrationMap(edges, [round(float(c), 6) for c in centres], counts.astype(int).tolist()), False
    correct = (probabilities.argmax(axis=1) == y).astype(np.float64)
    hits = np.bincount(idx, weights=correct, minlength=CALIBRATION_BINS)
    # Laplace-style shrinkage toward the bin centre so sparse bins do not claim 0% or 100%.
    acc = (hits + centres) / (counts + 1.0)
    acc = np.clip(_pav(acc, counts + 1.0), 0.0, 1.0)
    return CalibrationMap(edges, [round(float(a), 6) for a in acc], counts.astype(int).tolist()), True


def feature_ranges(features: np.ndarray, names: list[str]) -> list[FeatureSpec]:
    """Valid range per feature: the reference min/max widened by three times the span on each side, never below
    0 for a feature that is never negative in the reference (counts, sizes, intensities). Values outside are
    rejected as out-of-range inputs. The range is for garbage (unit errors, corrupted fields), not for drift:
    heavy-tailed features legitimately exceed the reference maximum, and such values are still served and
    land in the overflow bin that drift detection watches."""
    specs = []
    for j, n in enumerate(names):
        col = features[:, j]
        col = col[~np.isnan(col)]
        lo, hi = (float(col.min()), float(col.max())) if col.size else (0.0, 0.0)
        span = max(hi - lo, abs(hi) * 0.1, 1e-6)
        low = lo - 3.0 * span
        if lo >= 0:
            low = max(0.0, low)
        specs.append(FeatureSpec(n, round(low, 6), round(hi + 3.0 * span, 6)))
    return specs


def golden_tolerance(mode: str) -> float:
    """Absolute tolerance on probabilities for the on-device smoke test: int8 kernels differ across CPUs."""
    return 1e-4 if mode == "none" else 0.05
