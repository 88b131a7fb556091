"""What ``Agent.predict`` needs of a loaded model, resolved once per model, and what one call returns.

``HotModel`` holds the model's names, its staging rows (see ``window.Staging``) and a runtime runner bound to
one preallocated input row and one output row: for a tabular model the validator writes the input into both
the bound row and the staging row in its two ufunc calls, the runtime reads it in place and writes the
probabilities in place; only the result is copied (into the staging row and the caller's array). When the
staged rows are binned (every ``BATCH`` predictions, at window close, and on the agent's one-second tick)
``HotModel.staged`` hands them to the prediction log as one block and to the version's latency ring.
``VersionStats`` is that ring with the probation counters (issue 5).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import imaging
from .errors import InputError, ModelLoadError
from .model import LoadedModel
from .predlog import PredictionLog
from .probation import StatsSnapshot
from .runtime import Runner
from .window import Staging

log = logging.getLogger("edgefleet.agent")
_BYTES = (bytes, bytearray, memoryview)

#: Decoded images held for their derived statistics until the staged rows are binned, at most this many bytes:
#: past it the statistics are computed at once (large camera frames are never held long).
HELD_IMAGE_BYTES = 1 << 20


@dataclass(slots=True)
class Prediction:
    prediction_id: str
    model: str
    version: str
    label: str
    class_index: int
    confidence: float
    probabilities: np.ndarray
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"prediction_id": self.prediction_id, "model": self.model, "version": self.version,
                "label": self.label, "class_index": self.class_index, "confidence": self.confidence,
                "probabilities": [float(p) for p in self.probabilities], "latency_ms": self.latency_ms}


class VersionStats:
    """Per-version counters for probation: a ring of the last ``size`` latencies (ns) and two counts.

    Updated under the agent's lock: a block of latencies when staged rows are binned, errors as they happen."""

    __slots__ = ("errors", "lat", "predictions", "seen", "size")

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self.lat = [0] * size
        self.seen = 0
        self.predictions = 0
        self.errors = 0

    def observe(self, latency_ns: int) -> None:
        self.lat[self.seen % self.size] = latency_ns
        self.seen += 1
        self.predictions += 1

    def observe_many(self, latencies_ns: Sequence[int]) -> None:
        size, lat, seen = self.size, self.lat, self.seen
        for v in latencies_ns:
            lat[seen % size] = v
            seen += 1
        self.predictions += seen - self.seen
        self.seen = seen

    def raw(self) -> tuple[int, int, int, list[int]]:
        """The counters and a copy of the ring (cheap: taken under the agent's lock)."""
        return self.predictions, self.errors, self.seen, self.lat[:]

    @staticmethod
    def snapshot(raw: tuple[int, int, int, list[int]]) -> StatsSnapshot:
        """Order the ring oldest first, in milliseconds (outside the lock)."""
        predictions, errors, seen, lat = raw
        size = len(lat)
        n = min(seen, size)
        start = seen - n
        return StatsSnapshot(predictions, errors, seen, tuple(lat[(start + i) % size] / 1e6 for i in range(n)))


class HotModel:
    """A loaded model as the hot path uses it. Raises ModelLoadError when the package's reference profile and
    input schema disagree on the tabular features (the validated input is staged as the feature row)."""

    __slots__ = ("classes", "flush_failures", "image", "images_seen", "input", "log", "log_model", "model", "name",
                 "output", "prefix", "run", "staging", "stats_every", "validator", "version", "vstats")

    def __init__(self, model: LoadedModel, vstats: VersionStats, prediction_log: PredictionLog | None,
                 prefix: str, stats_every: int = 1) -> None:
        self.model = model
        self.name, self.version, self.classes = model.name, model.version, model.classes
        self.validator = model.validator
        self.image = model.manifest.input.image
        self.vstats = vstats
        self.log = prediction_log
        self.log_model = prediction_log.model_index(model.name, model.version) if prediction_log is not None else 0
        self.flush_failures = 0
        self.prefix = prefix  # prediction ids are <prefix><counter>
        self.stats_every = max(1, stats_every)  # derived statistics on 1 image in N
        self.images_seen = 0
        self.staging = Staging(len(model.profile.features), len(model.classes))
        if self.image is None:
            if model.validator.width != self.staging.features.shape[1]:
                raise ModelLoadError(f"{model.name} {model.version}: the reference profile has "
                                     f"{self.staging.features.shape[1]} features, the input schema "
                                     f"{model.validator.width}")
            shape: tuple[int, ...] = (model.validator.width,)
        else:
            blank = np.zeros((self.image.height, self.image.width) + (() if self.image.color == "gray" else (3,)),
                             dtype=np.uint8)
            shape = imaging.to_input(blank, self.image).shape
        # One bound input row and one output row, reused by every staged call (the output is then copied into the
        # staging row). A ring of bindings, one per staging row and no copy at all, measured no faster in the
        # benchmark (within ±0.3 µs either way): each binding is cold in the cache when its turn comes.
        self.input = np.zeros((1, *shape), dtype=np.float32)
        self.output = np.zeros((1, len(model.classes)), dtype=np.float32)
        self.run: Runner = model.runtime.bind([self.input], [self.output])[0]
        self.staging.on_flush = self.staged

    def features(self, x: Any) -> Any:
        """A tabular model's input that is not an array: a name -> value mapping becomes a validated row.
        Raises InputError for image bytes and for a bad mapping."""
        if isinstance(x, _BYTES):
            raise InputError("this model takes numeric features, not an image", kind="wrong_shape")
        return self.validator.named(x) if isinstance(x, Mapping) else x

    def image_input(self, x: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode and preprocess an image as the package declares: (model input, the decoded image when this
        one is sampled for derived statistics, else None). Raises InputError."""
        spec = self.image
        if spec is None or not isinstance(x, _BYTES):
            raise InputError("this model takes an encoded image (PNG, JPEG, …), not numbers", kind="wrong_shape")
        img = imaging.decode(bytes(x), spec)
        self.images_seen += 1
        return imaging.to_input(img, spec), (img if (self.images_seen - 1) % self.stats_every == 0 else None)

    def hold(self, img: np.ndarray) -> None:
        """Keep a sampled image (under the agent's lock) for its derived statistics, computed with the same
        ``imaging.image_stats`` as the reference profile when the staged rows are binned."""
        st = self.staging
        st.images.append(img)
        st.image_bytes += img.nbytes
        if st.image_bytes > HELD_IMAGE_BYTES:
            self.settle_images(st)

    def settle_images(self, st: Staging) -> None:
        """Turn the held images into feature rows (their derived statistics) and let them go. Never raises: an
        image whose statistics fail (cv2 on an image it decoded itself: not expected) is logged, counted in
        ``flush_failures`` and left out of the feature histograms; its prediction still counts."""
        for img in st.images:
            try:
                st.features[st.nf] = imaging.image_stats(img)
            except Exception:  # noqa: BLE001 - see the docstring
                self.flush_failures += 1
                log.exception("derived statistics of a held %s image failed", img.shape)
                continue
            st.nf += 1
        st.images.clear()
        st.image_bytes = 0

    def staged(self, st: Staging, predicted: np.ndarray, confidence: np.ndarray) -> None:
        """Called (under the agent's lock) just before the staged rows are binned: held images into feature
        rows, latencies into the version's ring, one block of records into the prediction log. A failure here is
        logged and counted, never raised: binning must go on."""
        k = st.k
        self.settle_images(st)
        try:
            self.vstats.observe_many(st.latency[:k])
            if self.log is not None:
                started = np.asarray(st.started[:k], dtype=np.float64)
                at = time.time() - (time.perf_counter_ns() - started) * 1e-9
                self.log.record_many(np.asarray(st.ids[:k], dtype=np.int64), at, self.log_model, predicted,
                                     confidence)
        except Exception:  # noqa: BLE001 - the summary must not lose rows because the log failed
            self.flush_failures += 1
            log.exception("logging %d staged predictions failed", k)
