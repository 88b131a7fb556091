"""One summary window: counts and sums accumulated on the hot path, with binning deferred to small batches.

``observe`` copies one valid row (features, probabilities, latency) into preallocated buffers — no allocation
beyond that, no I/O. Every ``BATCH`` rows (and at window close) the buffers are binned in one vectorised pass.
Rejected inputs are counted with ``reject``; fed-back labels with ``label``. ``to_summary`` produces the wire
contract. No raw value is kept past the buffer flush, and the buffer itself never leaves the process.
"""

from __future__ import annotations

import numpy as np

from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.summary import LATENCY_EDGES_MS, FeatureWindow, Summary

from .binning import Binner

BATCH = 128
_LAT_EDGES_NS = np.asarray(LATENCY_EDGES_MS, dtype=np.float64) * 1e6


class Window:
    def __init__(self, profile: Profile, calibration: CalibrationMap, lows: np.ndarray, highs: np.ndarray) -> None:
        self.names = [f.name for f in profile.features]
        self.n_features = len(self.names)
        self.n_classes = len(profile.classes)
        self.binner = Binner([f.edges for f in profile.features])
        if len(lows) == self.n_features:
            self.binner.set_domain(lows, highs)
        ref = np.concatenate([np.asarray(f.counts) for f in profile.features])
        self._empty_ref = ref == 0  # bins with no reference data: estimates there are not trustworthy
        self._conf_edges = np.asarray(profile.confidence_edges, dtype=np.float64)
        self._cal_edges = np.asarray(calibration.edges, dtype=np.float64)
        self._cal_acc = np.asarray(calibration.accuracy, dtype=np.float64)
        self.counts = np.zeros(self.binner.total, dtype=np.int64)
        self.missing = np.zeros(self.n_features, dtype=np.int64)
        self.nan = np.zeros(self.n_features, dtype=np.int64)
        self.out_of_range = np.zeros(self.n_features, dtype=np.int64)
        self.n = np.zeros(self.n_features, dtype=np.int64)
        self.sum = np.zeros(self.n_features, dtype=np.float64)
        self.sumsq = np.zeros(self.n_features, dtype=np.float64)
        self.class_counts = np.zeros(self.n_classes, dtype=np.int64)
        self.conf_counts = np.zeros(len(self._conf_edges) - 1, dtype=np.int64)
        self.cal_sum = np.zeros(self.n_classes, dtype=np.float64)
        self.lat_counts = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        self.errors: dict[str, int] = {}
        self.confusion: np.ndarray | None = None
        self.empty_bins = 0
        self.count = 0
        self._fbuf = np.empty((BATCH, self.n_features), dtype=np.float32)
        self._pbuf = np.empty((BATCH, self.n_classes), dtype=np.float32)
        self._lbuf = np.empty(BATCH, dtype=np.float64)
        self._k = 0

    # ---- hot path ----------------------------------------------------------------------------------------
    def observe(self, features: np.ndarray, probabilities: np.ndarray, latency_ns: int) -> None:
        k = self._k
        self._fbuf[k] = features
        self._pbuf[k] = probabilities
        self._lbuf[k] = latency_ns
        self._k = k + 1
        self.count += 1
        if self._k == BATCH:
            self.flush()

    def observe_many(self, features: np.ndarray, probabilities: np.ndarray, latency_ns: np.ndarray) -> None:
        self.flush()
        self._bin(np.asarray(features, np.float64), np.asarray(probabilities, np.float64),
                  np.asarray(latency_ns, np.float64))
        self.count += len(features)

    # ---- batched ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        k = self._k
        if k:
            self._bin(self._fbuf[:k].astype(np.float64), self._pbuf[:k].astype(np.float64), self._lbuf[:k])
            self._k = 0

    def _bin(self, f: np.ndarray, p: np.ndarray, lat: np.ndarray) -> None:
        if f.size:
            ok = np.isfinite(f) & (f >= self.binner._lo) & (f <= self.binner._hi)
            if ok.all():
                idx = self.binner.indices_fast(f)
            else:
                idx = self.binner.indices(f)
                ok = ~np.isnan(f)
            flat = (idx + self.binner.offsets[None, :])[ok]
            self.counts += np.bincount(flat, minlength=self.binner.total)
            self.empty_bins += int(self._empty_ref[flat].sum())
            fz = np.where(ok, f, 0.0)
            self.n += ok.sum(axis=0)
            self.sum += fz.sum(axis=0)
            self.sumsq += (fz * fz).sum(axis=0)
        pred = p.argmax(axis=1)
        conf = p.max(axis=1)
        self.class_counts += np.bincount(pred, minlength=self.n_classes)
        ci = np.clip(np.searchsorted(self._conf_edges, conf, side="right") - 1, 0, len(self.conf_counts) - 1)
        self.conf_counts += np.bincount(ci, minlength=len(self.conf_counts))
        ki = np.clip(np.searchsorted(self._cal_edges, conf, side="right") - 1, 0, len(self._cal_acc) - 1)
        self.cal_sum += np.bincount(pred, weights=self._cal_acc[ki], minlength=self.n_classes)
        self.lat_counts += np.bincount(np.searchsorted(_LAT_EDGES_NS, lat, side="right"),
                                       minlength=len(self.lat_counts))

    # ---- rejections and labels -------------------------------------------------------------------------
    def reject(self, kind: str, feature: str | None = None) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if feature is None or feature not in self.names:
            return
        j = self.names.index(feature)
        if kind == "missing_field":
            self.missing[j] += 1
        elif kind == "nan":
            self.nan[j] += 1
        elif kind == "out_of_range":
            self.out_of_range[j] += 1

    def label(self, true_class: int, predicted: int) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        self.confusion[true_class, predicted] += 1

    # ---- wire ------------------------------------------------------------------------------------------
    def to_summary(self, device_id: str, model: str, version: str, seq: int, start: str, end: str) -> Summary:
        self.flush()
        per = self.binner.split(self.counts)
        feats = [
            FeatureWindow(name, per[j], int(self.missing[j]), int(self.nan[j]), int(self.out_of_range[j]),
                          int(self.n[j]), round(float(self.sum[j]), 9), round(float(self.sumsq[j]), 9))
            for j, name in enumerate(self.names)
        ]
        return Summary(
            device_id=device_id, model=model, version=version, seq=seq, start=start, end=end, count=self.count,
            features=feats, class_counts=self.class_counts.tolist(), confidence_counts=self.conf_counts.tolist(),
            calibrated_sum=[round(float(v), 9) for v in self.cal_sum], latency_counts=self.lat_counts.tolist(),
            errors=dict(self.errors), confusion=self.confusion.tolist() if self.confusion is not None else None,
            empty_bins=self.empty_bins,
        )
