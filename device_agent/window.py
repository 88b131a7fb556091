"""One summary window: counts and sums accumulated from the hot path, with binning deferred to small batches.

The hot path writes each prediction into a :class:`Staging` row — the validated features, the model's output
and the latency — and nothing else: no allocation, no I/O (the agent's validator writes the features row in
the same ufunc calls that check the input). Every ``BATCH`` rows, and always before a window is summarised, the
staged rows are binned in one vectorised pass (``flush``). Rejected inputs are counted with ``reject``;
fed-back labels with ``label``. ``to_summary`` produces the wire contract. No raw value is kept past the flush,
and the staging rows never leave the process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.summary import LATENCY_EDGES_MS, FeatureWindow, Summary

from .binning import Binner

BATCH = 128
_LAT_EDGES_NS = np.asarray(LATENCY_EDGES_MS, dtype=np.float64) * 1e6


class Staging:
    """Preallocated rows for up to ``size`` predictions awaiting binning.

    Row ``i`` of ``outputs`` (float32 ``[size, C]``) and ``latency[i]`` belong to the ``i``-th staged
    prediction, ``k`` of them so far. ``features`` (float32 ``[size, F]``) holds ``nf`` feature rows: one per
    prediction for tabular models (``nf == k``), one per *sampled* image for image models (their derived
    statistics), so ``nf <= k``. ``ids`` and ``started`` (prediction counter and
    perf-counter start, ns) are Python lists: storing a Python int there is cheaper than a numpy store, and they
    are read once per flush. ``feature_rows[i]`` / ``output_rows[i]`` are ``[1, F]`` / ``[1, C]`` views, made once.
    ``on_flush(staging, predicted, confidence)``, when set, sees the staged rows (and the predicted class and
    confidence of each, computed once for both) just before they are binned (the agent logs them then,
    and turns ``images`` — decoded images sampled for derived statistics, ``image_bytes`` in all — into
    feature rows).
    """

    __slots__ = ("feature_rows", "features", "ids", "image_bytes", "images", "k", "latency", "nf", "on_flush",
                 "output_rows", "outputs", "size", "started")

    def __init__(self, n_features: int, n_classes: int, size: int = BATCH) -> None:
        self.size = size
        self.features = np.zeros((size, n_features), dtype=np.float32)
        self.outputs = np.zeros((size, n_classes), dtype=np.float32)
        self.feature_rows = [self.features[i : i + 1] for i in range(size)]
        self.output_rows = [self.outputs[i : i + 1] for i in range(size)]
        self.latency = [0] * size
        self.ids = [0] * size
        self.started = [0] * size
        self.k = 0
        self.nf = 0
        self.on_flush: Callable[[Staging, np.ndarray, np.ndarray], None] | None = None
        self.images: list[np.ndarray] = []
        self.image_bytes = 0


class Window:
    def __init__(self, profile: Profile, calibration: CalibrationMap, lows: np.ndarray, highs: np.ndarray,
                 staging: Staging | None = None) -> None:
        """``staging``: the rows to bin from (the agent hands each new window the previous one's, which its hot
        path keeps writing); a fresh one when omitted. Raises ValueError when their shape does not fit."""
        self.names = [f.name for f in profile.features]
        self.n_features = len(self.names)
        self.n_classes = len(profile.classes)
        self.binner = Binner([f.edges for f in profile.features])
        if len(lows) == self.n_features:
            self.binner.set_domain(lows, highs)
        ref = np.concatenate([np.asarray(f.counts) for f in profile.features])
        self._empty_ref = (ref == 0).astype(np.int64)  # bins with no reference data: estimates are untrustworthy
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
        self.count = 0  # predictions observed, staged ones included
        if staging is not None and (staging.features.shape[1] != self.n_features
                                    or staging.outputs.shape[1] != self.n_classes):
            raise ValueError(f"staging rows are [{staging.features.shape[1]} features, {staging.outputs.shape[1]} "
                             f"classes]; this window needs [{self.n_features}, {self.n_classes}]")
        self.staging: Staging | None = staging if staging is not None else Staging(self.n_features, self.n_classes)

    # ---- hot path ----------------------------------------------------------------------------------------
    def observe(self, features: np.ndarray | None, probabilities: np.ndarray, latency_ns: int) -> None:
        """Stage one prediction (a copy of its features — None for an image whose statistics were not sampled —
        and outputs). The agent writes staging rows directly instead; this is the convenient form."""
        st = self.staging
        assert st is not None, "observe on a window that handed its staging rows over"
        k = st.k
        if features is not None:
            st.features[st.nf] = features
            st.nf += 1
        st.outputs[k] = probabilities
        st.latency[k] = latency_ns
        st.k = k + 1
        self.count += 1
        if k + 1 == st.size:
            self.flush()

    def observe_many(self, features: np.ndarray, probabilities: np.ndarray, latency_ns: np.ndarray) -> None:
        self.flush()
        self._bin_features(np.asarray(features, np.float64))
        p = np.asarray(probabilities)
        if len(p):
            self._bin_outputs(p.argmax(axis=1), p.max(axis=1).astype(np.float64),
                              np.asarray(latency_ns, np.float64))
        self.count += len(features)

    # ---- batched ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Bin the staged rows into the counts and empty the staging (no-op once handed over)."""
        st = self.staging
        if st is None:
            return
        k = st.k
        if k:
            out = st.outputs[:k]
            pred, conf = out.argmax(axis=1), out.max(axis=1)
            if st.on_flush is not None:
                st.on_flush(st, pred, conf)
        if st.nf:
            self._bin_features(st.features[: st.nf].astype(np.float64))
        if k:
            self._bin_outputs(pred, conf.astype(np.float64), np.asarray(st.latency[:k], np.float64))
        st.k = st.nf = 0

    def handover(self) -> Staging:
        """Flush, then give the staging rows to the next window: this window no longer stages anything."""
        self.flush()
        st = self.staging
        assert st is not None, "staging rows already handed over"
        self.staging = None
        return st

    def _bin_features(self, f: np.ndarray) -> None:
        if not f.size:
            return
        ok = np.isfinite(f) & (f >= self.binner._lo) & (f <= self.binner._hi)
        if ok.all():  # validated rows: one search for all features, no masks
            bc = np.bincount((self.binner.indices_fast(f) + self.binner.offsets[None, :]).ravel(),
                             minlength=self.binner.total)
            self.n += len(f)
            self.sum += f.sum(axis=0)
            self.sumsq += np.einsum("ij,ij->j", f, f)
        else:
            idx = self.binner.indices(f)
            ok = ~np.isnan(f)
            bc = np.bincount((idx + self.binner.offsets[None, :])[ok], minlength=self.binner.total)
            fz = np.where(ok, f, 0.0)
            self.n += ok.sum(axis=0)
            self.sum += fz.sum(axis=0)
            self.sumsq += (fz * fz).sum(axis=0)
        self.counts += bc
        self.empty_bins += int(bc @ self._empty_ref)

    def _bin_outputs(self, pred: np.ndarray, conf: np.ndarray, lat: np.ndarray) -> None:
        """Predicted classes, their confidence (float64) and latencies (ns) of a batch."""
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
