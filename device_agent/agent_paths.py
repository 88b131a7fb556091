"""The agent's prediction paths besides the hot one (``Agent.predict``): a caller that found ``predict`` busy
runs on private arrays (contended), and batches run in one runtime call. Mixed into ``Agent``: they share its
lock, staging rows, windows and counters (see ``device_agent.agent`` for the locking rules)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InferenceError, InputError, NoModelError
from .hotpath import HotModel, Prediction

if TYPE_CHECKING:
    from .agent import Counters
    from .predlog import PredictionLog
    from .window import Window

__all__ = ["OtherPaths"]


class OtherPaths:
    """Contended and batch prediction for ``Agent`` (which provides every attribute declared here)."""

    _lock: threading.Lock
    _swap_lock: threading.Lock
    _busy: int
    _hot: HotModel | None
    _window: Window | None
    _window_count: int
    _ids: Iterator[int]
    counters: Counters
    log: PredictionLog | None

    def predict(self, x: Any) -> Prediction:  # pragma: no cover - Agent's
        raise NotImplementedError

    def batch(self) -> contextlib.AbstractContextManager[None]:  # pragma: no cover - Agent's
        raise NotImplementedError

    def _reject(self, kind: str, feature: str | None) -> None:  # pragma: no cover - Agent's
        raise NotImplementedError

    def _maybe_close_by_count(self) -> None:  # pragma: no cover - Agent's
        raise NotImplementedError

    def _predict_contended(self, x: Any, t0: int) -> Prediction:
        """Another thread is inside predict: validate and run on private arrays (no waiting for the lock while
        the model runs), then stage a copy of the result under the lock. The agent is ``busy`` meanwhile, so a
        model swap waits for this prediction and it is counted in its own model's window."""
        with self._swap_lock:
            hot = self._hot
            self._busy += 1
        try:
            return self._predict_private(x, t0, hot)
        finally:
            with self._swap_lock:
                self._busy -= 1

    def _predict_private(self, x: Any, t0: int, hot: HotModel | None) -> Prediction:
        if hot is None:
            raise NoModelError("no model installed on this device; install one with `device-agent install`")
        sampled = None
        try:
            if hot.image is None:
                row = hot.validator.row(hot.features(x))
            else:
                flat, sampled = hot.image_input(x)
                row = flat[None, ...]
        except InputError as exc:
            self._reject(exc.kind, exc.feature)
            raise
        try:
            out = hot.model.runtime.run_checked(row)
        except InferenceError:
            self._reject("inference", None)
            with self._lock:
                hot.vstats.errors += 1
            raise
        lat = time.perf_counter_ns() - t0
        result = np.array(out[0], dtype=np.float32)
        probs = result.tolist()
        conf = max(probs)
        ci = probs.index(conf)
        n = next(self._ids)
        close = False
        with self._lock:
            self.counters.predictions += 1
            self.counters.contended += 1
            if self._hot is hot:
                st = hot.staging
                k = st.k
                st.outputs[k] = result
                if hot.image is None:
                    st.features[st.nf] = row[0]
                    st.nf += 1
                elif sampled is not None:
                    hot.hold(sampled)
                st.latency[k] = lat
                st.started[k] = t0
                st.ids[k] = n
                st.k = k + 1
                w = self._window
                w.count += 1  # type: ignore[union-attr]
                if k + 1 == st.size:
                    w.flush()  # type: ignore[union-attr]
                close = w.count >= self._window_count  # type: ignore[union-attr]
            else:  # cannot happen (a swap waits while this is busy); kept so a bug loses a window row, not a result
                hot.vstats.observe(lat)
                if self.log is not None:
                    self.log.record(n, time.time(), hot.log_model, ci, conf)
        if close:
            self._maybe_close_by_count()
        return Prediction(f"{hot.prefix}{n}", hot.name, hot.version, hot.classes[ci], ci, conf, result, lat / 1e6)

    def predict_batch(self, xs: Sequence[Any] | np.ndarray) -> list[Prediction | InputError]:
        """Predict many inputs in one runtime call; a bad input yields its InputError in place, not a failure.

        The whole batch is served by one model version (``busy()`` is true meanwhile)."""
        with self.batch():
            return self._predict_batch(xs)

    def _predict_batch(self, xs: Sequence[Any] | np.ndarray) -> list[Prediction | InputError]:
        hot = self._hot
        if hot is None:
            raise NoModelError("no model installed on this device; install one with `device-agent install`")
        m = hot.model
        if isinstance(xs, np.ndarray) and hot.image is None:
            t0 = time.perf_counter_ns()
            try:
                good, errors = m.validator.rows(xs)
            except InputError as exc:  # the batch as a whole (its shape, its type): counted like any refusal
                self._reject(exc.kind, exc.feature)
                raise
            for e in errors:
                if e is not None:
                    self._reject(e.kind, e.feature)
            try:
                probs = m.runtime.run(good) if len(good) else np.zeros((0, len(m.classes)), np.float32)
            except InferenceError:
                with self._lock:
                    hot.vstats.errors += len(good)
                raise
            lat = (time.perf_counter_ns() - t0) / max(1, len(good))
            out: list[Prediction | InputError] = []
            it = iter(range(len(good)))
            preds = probs.argmax(axis=1) if len(good) else np.zeros(0, np.int64)
            with self._lock:
                if self._window is not None and self._hot is hot and len(good):
                    self._window.observe_many(good, probs, np.full(len(good), lat))  # flushes staged rows first
                self.counters.predictions += len(good)
                hot.vstats.observe_many([int(lat)] * len(good))
            now = time.time()
            for e in errors:
                if e is not None:
                    out.append(e)
                    continue
                i = next(it)
                ci = int(preds[i])
                n = next(self._ids)
                if self.log is not None:
                    self.log.record(n, now, hot.log_model, ci, float(probs[i, ci]))
                out.append(Prediction(f"{hot.prefix}{n}", hot.name, hot.version, hot.classes[ci], ci,
                                      float(probs[i, ci]), probs[i], lat / 1e6))
            self._maybe_close_by_count()
            return out
        results: list[Prediction | InputError] = []
        for x in xs:
            try:
                results.append(self.predict(x))
            except InputError as exc:
                results.append(exc)
        return results
