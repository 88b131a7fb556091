"""Reference profile and confidence calibration map: the baseline a package carries for drift and accuracy.

``profile.json``: per input feature (for images: per derived statistic) bin edges at reference quantiles with
counts (``len(edges) + 1`` counts: underflow, inner bins, overflow — see ``device_agent.binning``), missing
count, moments; the predicted-class counts and confidence histogram of the packaged model on the same data.

``calibration.json``: a monotone map from top-class confidence to the probability the prediction is right,
fitted on holdout labels; the agent sums calibrated confidences per window so the server can estimate
accuracy without labels (confidence-based performance estimation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _fields as f
from .errors import SchemaError

PROFILE_TYPE = "edgefleet.profile"
CALIBRATION_TYPE = "edgefleet.calibration"
SPEC = 1


def _floats(d: dict[str, Any], key: str, what: str) -> list[float]:
    v = f.array(d, key, what)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        raise SchemaError(f"{what}.{key} must be a list of numbers")
    return [float(x) for x in v]


def _counts(d: dict[str, Any], key: str, what: str) -> list[int]:
    v = f.array(d, key, what)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise SchemaError(f"{what}.{key} must be a list of non-negative integers")
    return list(v)


def _edges(d: dict[str, Any], what: str) -> list[float]:
    e = _floats(d, "edges", what)
    if not e or any(b <= a for a, b in zip(e, e[1:], strict=False)):
        raise SchemaError(f"{what}.edges must be a non-empty strictly increasing list")
    return e


@dataclass(frozen=True)
class FeatureProfile:
    name: str
    edges: list[float]
    counts: list[int]
    missing: int
    mean: float
    std: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "edges": self.edges, "counts": self.counts, "missing": self.missing,
                "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Profile:
    n: int
    features: list[FeatureProfile]
    classes: list[str]
    class_counts: list[int]
    confidence_edges: list[float]
    confidence_counts: list[int]

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Raises SchemaError naming the bad field."""
        d = f.obj(d, "profile")
        f.const(d, "type", PROFILE_TYPE, "profile")
        f.const(d, "spec", SPEC, "profile")
        feats = []
        for i, fd in enumerate(f.array(d, "features", "profile")):
            w = f"profile.features[{i}]"
            fd = f.obj(fd, w)
            edges = _edges(fd, w)
            counts = _counts(fd, "counts", w)
            if len(counts) != len(edges) + 1:
                raise SchemaError(f"{w}.counts must have len(edges) + 1 = {len(edges) + 1} entries")
            feats.append(FeatureProfile(f.string(fd, "name", w), edges, counts, f.integer(fd, "missing", w, minimum=0),
                                        f.number(fd, "mean", w), f.number(fd, "std", w)))
        out = f.obj(d.get("output"), "profile.output")
        classes = f.array(out, "classes", "profile.output")
        class_counts = _counts(out, "class_counts", "profile.output")
        if len(class_counts) != len(classes):
            raise SchemaError("profile.output.class_counts must have one count per class")
        cedges = _edges(out, "profile.output.confidence")
        ccounts = _counts(out, "confidence_counts", "profile.output")
        if len(ccounts) != len(cedges) - 1:
            raise SchemaError("profile.output.confidence_counts must have len(edges) - 1 entries")
        return cls(f.integer(d, "n", "profile", minimum=1), feats, [str(c) for c in classes], class_counts,
                   cedges, ccounts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": PROFILE_TYPE, "spec": SPEC, "n": self.n,
            "features": [x.to_dict() for x in self.features],
            "output": {"classes": self.classes, "class_counts": self.class_counts,
                       "edges": self.confidence_edges, "confidence_counts": self.confidence_counts},
        }


@dataclass(frozen=True)
class CalibrationMap:
    """Top-class confidence bins (equal width on [0, 1]) and the observed accuracy in each (monotone)."""

    edges: list[float]
    accuracy: list[float]
    counts: list[int]

    @classmethod
    def from_dict(cls, d: Any) -> CalibrationMap:
        d = f.obj(d, "calibration")
        f.const(d, "type", CALIBRATION_TYPE, "calibration")
        edges = _edges(d, "calibration")
        acc = _floats(d, "accuracy", "calibration")
        counts = _counts(d, "counts", "calibration")
        if len(acc) != len(edges) - 1 or len(counts) != len(edges) - 1:
            raise SchemaError("calibration.accuracy and .counts need len(edges) - 1 entries")
        if any(not 0.0 <= a <= 1.0 for a in acc):
            raise SchemaError("calibration.accuracy values must lie in [0, 1]")
        return cls(edges, acc, counts)

    def to_dict(self) -> dict[str, Any]:
        return {"type": CALIBRATION_TYPE, "spec": SPEC, "edges": self.edges, "accuracy": self.accuracy,
                "counts": self.counts}
