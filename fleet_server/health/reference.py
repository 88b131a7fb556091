"""What a model version is compared with (:class:`Reference`) and where each summary field sits in the flat
vector that summaries of that version add up in (:class:`Layout`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.summary import ERROR_KINDS, LATENCY_EDGES_MS, noise_variance

from ..registry import profile_of, version_row
from ..store import Store


@dataclass(frozen=True)
class Reference:
    model: str
    version: str
    profile: Profile
    calibration: CalibrationMap
    accuracy: float | None  # what the package promised: evaluation accuracy, else the calibration map's
    accuracy_source: str

    @classmethod
    def load(cls, store: Store, model: str, version: str) -> Reference:
        """Raises NotFoundError when the version is not published."""
        prof, cal = profile_of(store, model, version)
        profile, calibration = Profile.from_dict(prof), CalibrationMap.from_dict(cal)
        evaluation = json.loads(version_row(store, model, version)["manifest"]).get("evaluation") or {}
        acc = evaluation.get("accuracy")
        if isinstance(acc, int | float) and not isinstance(acc, bool):
            return cls(model, version, profile, calibration, float(acc), "package evaluation (holdout)")
        w = np.asarray(calibration.counts, dtype=np.float64)
        if w.sum() > 0:
            mean = float((np.asarray(calibration.accuracy) * w).sum() / w.sum())
            return cls(model, version, profile, calibration, mean, "calibration map (count-weighted)")
        return cls(model, version, profile, calibration, None, "none")


class Layout:
    """Where each summary field sits in one flat float vector, so summaries of a version add as arrays."""

    def __init__(self, profile: Profile) -> None:
        self.names = [f.name for f in profile.features]
        self.sizes = [len(f.edges) + 1 for f in profile.features]
        self.n_features = len(self.names)
        self.n_classes = len(profile.classes)
        self.n_conf = len(profile.confidence_counts)
        self.width = max(self.sizes, default=1)
        self.error_kinds = list(ERROR_KINDS)
        f, c = self.n_features, self.n_classes
        spans = [("bins", sum(self.sizes)), ("missing", f), ("nan", f), ("oor", f), ("n", f), ("classes", c),
                 ("conf", self.n_conf), ("cal", c), ("latency", len(LATENCY_EDGES_MS) + 1),
                 ("errors", len(self.error_kinds)), ("confusion", c * c), ("scalars", 4),
                 ("noise", 1)]
        self.slices: dict[str, slice] = {}
        at = 0
        for name, size in spans:
            self.slices[name] = slice(at, at + size)
            at += size
        self.size = at
        # scatter index: flat bins -> [feature, bin] of a zero-padded [F, width] matrix
        self._pad_index = np.concatenate([j * self.width + np.arange(s) for j, s in enumerate(self.sizes)]) \
            if self.sizes else np.zeros(0, dtype=np.int64)
        self.reference = self.feature_matrix_from(np.concatenate([np.asarray(p.counts, dtype=np.float64)
                                                                  for p in profile.features]))

    def row(self, body: dict[str, Any]) -> np.ndarray | None:
        """One stored summary body as a vector; None when its bins do not match the profile's."""
        feats = body.get("features") or []
        out, ops = body.get("output") or {}, body.get("ops") or {}
        if len(feats) != self.n_features:
            return None
        vals: list[float] = []
        extra: list[list[float]] = [[], [], [], []]
        for fd, size in zip(feats, self.sizes, strict=True):
            counts = fd.get("counts") or []
            if len(counts) != size:
                return None
            vals.extend(counts)
            extra[0].append(fd.get("missing", 0))
            extra[1].append(fd.get("nan", 0))
            extra[2].append(fd.get("out_of_range", 0))
            extra[3].append(fd.get("n", 0))
        for e in extra:
            vals.extend(e)
        classes = out.get("class_counts") or []
        conf = out.get("confidence_counts") or []
        cal = out.get("calibrated_sum") or []
        lat = ops.get("latency_counts") or []
        if len(classes) != self.n_classes or len(conf) != self.n_conf or len(cal) != self.n_classes \
                or len(lat) != len(LATENCY_EDGES_MS) + 1:
            return None
        vals.extend(classes)
        vals.extend(conf)
        vals.extend(cal)
        vals.extend(lat)
        errs = [0.0] * len(self.error_kinds)
        for kind, v in (ops.get("errors") or {}).items():
            errs[self.error_kinds.index(kind) if kind in self.error_kinds else self.error_kinds.index("other")] += v
        vals.extend(errs)
        confusion = (body.get("labels") or {}).get("confusion")
        if confusion is not None and len(confusion) == self.n_classes:
            for r in confusion:
                vals.extend(r)
        else:
            vals.extend([0.0] * (self.n_classes * self.n_classes))
        win = body.get("window") or {}
        vals.extend([win.get("count", 0), win.get("windows", 1), out.get("empty_bins", 0), 1.0])
        vals.append(_noise_variance(body.get("privacy") or {}))
        vec = np.asarray(vals, dtype=np.float64)
        return vec if vec.size == self.size else None

    def feature_matrix_from(self, flat_bins: np.ndarray) -> np.ndarray:
        m = np.zeros(self.n_features * self.width)
        m[self._pad_index] = flat_bins
        return m.reshape(self.n_features, self.width)

    def part(self, vec: np.ndarray, name: str) -> np.ndarray:
        return vec[self.slices[name]]

    def noise_variance(self, vec: np.ndarray) -> float:
        """The variance that differential-privacy noise adds to each histogram count of the summed vector (0
        when no summary in it was noised): noise of independent releases adds."""
        return float(vec[self.slices["noise"]][0])

    def scalars(self, vec: np.ndarray) -> tuple[int, int, int, int]:
        """(predictions, raw windows, values in reference-empty bins, stored summaries)."""
        s = vec[self.slices["scalars"]]
        return int(s[0]), int(s[1]), int(s[2]), int(s[3])



def _noise_variance(privacy: dict[str, Any]) -> float:
    """One stored summary's per-count noise variance: ``privacy.noise_variance``, or for a summary of an
    earlier agent that did not send it, one release at its ``epsilon`` (Laplace 2/ε², rounding 1/12)."""
    nv = privacy.get("noise_variance")
    if nv:
        return float(nv)
    eps = privacy.get("epsilon")
    return noise_variance(eps) if eps else 0.0
