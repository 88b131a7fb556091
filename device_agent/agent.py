"""The on-device agent: validated, low-latency inference with local summaries.

``Agent.predict`` is the hot path: validate the input straight into the runtime's bound input row (and the
staging row), run the model in place (onnxruntime IOBinding), stage the output, id, start and latency. Every
``BATCH`` predictions (and at window close, and on the one-second tick) the staged rows are binned into the
window and handed to the prediction log as one block; closing a window (sequence number, k-anonymity, noise,
outbox write) happens on a background thread; the prediction log is written by its own thread. Nothing on the
hot path touches the disk or the network. A caller that finds another thread inside ``predict`` does not wait
for it: it validates and runs on private arrays and only stages a copy under the lock, so threads still infer
in parallel (that path and batches: ``agent_paths``).

For rollouts (issue 5) the agent also keeps, per model version it served since start, the successful
predictions, the inference errors (input-validation rejections are not errors of the model) and the most
recent latencies (``version_stats``): probation compares the new version's p95 with the previous one's. While a
batch runs (``batch()`` context, ``predict_batch``), and while a contended prediction runs, ``busy()`` is true and
``reload()`` waits (up to 0.2 s, then keeps the loaded model until the next tick), so a model swap never
splits a batch between two versions nor leaves a prediction out of its version's window.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet_contracts.signing import Ed25519PrivateKey, load_private_key, sign_envelope
from edgefleet_contracts.targets import Target
from edgefleet_contracts.timeutil import fmt, utcnow

from .agent_paths import OtherPaths
from .config import MIN_WINDOW_SAMPLES_FLOOR, DeviceConfig, DeviceDir
from .errors import (
    AgentError,
    FeedbackError,
    FeedbackUnavailableError,
    InferenceError,
    InputError,
    LabelWriteError,
    MalformedPredictionIdError,
    NoModelError,
    UnknownClassError,
    UnknownPredictionError,
)
from .hotpath import HotModel, Prediction, VersionStats
from .model import LoadedModel, load_model
from .predlog import PredictionLog
from .probation import StatsSnapshot
from .status import device_status_fields
from .summarizer import Closed, MemorySink, Summarizer, SummarySink
from .window import Window

log = logging.getLogger("edgefleet.agent")
_INDEX = re.compile(r"-?[0-9]{1,18}")  # a label given as a class index (ASCII digits: int() takes others too)

__all__ = ["Agent", "FeedbackError", "NoModelError", "Prediction", "VersionStats"]


@dataclass
class Counters:
    predictions: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    feedback: int = 0
    feedback_unmatched: int = 0
    windows_closed: int = 0
    contended: int = 0  # predictions that found another thread inside predict and ran on private arrays


class Agent(OtherPaths):
    def __init__(
        self,
        cfg: DeviceConfig,
        target: Target,
        model: LoadedModel | None,
        *,
        sink: SummarySink | None = None,
        prediction_log: PredictionLog | None = None,
        device_key: Ed25519PrivateKey | None = None,
        model_loader: Any = None,
        background: bool = True,
        active_probe: Any = None,
    ) -> None:
        self.cfg = cfg
        self.target = target
        self.sink = sink if sink is not None else MemorySink()
        self.log = prediction_log
        self.device_key = device_key
        self.counters = Counters()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._boot = f"{cfg.device_id}.{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"
        if self.log is not None:
            self.log.set_boot(self._boot)
        self._model_loader = model_loader
        self._active_probe = active_probe  # () -> (slot name, version) the pointer names, without loading it
        self.summarizer = Summarizer(cfg.device_id, self.sink, cfg.min_window_samples, cfg.dp_epsilon)
        self._model: LoadedModel | None = None
        self._hot: HotModel | None = None  # the model as predict uses it; swapped together with _window
        self._window_count = cfg.window_count
        self._window: Window | None = None
        self._window_start = utcnow()
        self._window_t0 = time.monotonic()
        self._vstats: dict[tuple[str, str], VersionStats] = {}
        self._busy = 0  # batches and contended predictions in flight (guarded by _swap_lock)
        self._swap_lock = threading.Lock()  # taken after _lock when both are held
        self._swap_pending = False  # a swap waits for _busy to drain: contended callers queue on _lock meanwhile
        self._reload_lock = threading.Lock()
        if model is not None:
            self._install_model(model)
        self.reload_failures = 0
        self.tick_failures = 0  # ticks that raised something unexpected (the ticker logs it and goes on)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if background:
            self._ticker = threading.Thread(target=self._tick_loop, name="window-ticker", daemon=True)
            self._ticker.start()

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, device_dir: Path, *, background: bool = True) -> Agent:
        """Open a provisioned device folder: config, target, key, active slot, outbox, prediction log.

        Raises ConfigError when the folder is not provisioned or config.toml is invalid; a device with no model
        yet opens and raises NoModelError on predict. A config.toml with ``min_window_samples`` below the privacy
        floor (10) and no ``allow_small_windows`` runs at the floor, with a warning (``DeviceConfig.from_dict``);
        one that waives the floor opens with a warning. A disk too full to open the outbox does not stop it: the
        outbox opens when space frees, and windows are held in memory until then (``outbox``, ``summarizer``).
        """
        from .outbox import Outbox
        from .updater import Updater, load_device_target

        d = DeviceDir(Path(device_dir))
        cfg = d.load_config()
        if cfg.min_window_samples < MIN_WINDOW_SAMPLES_FLOOR:  # only reachable with allow_small_windows = true
            log.warning("min_window_samples is %d, below the privacy floor of %d (allow_small_windows = true in %s): "
                        "a summary of so few predictions gives its inputs away through its exact sums (noise covers "
                        "the histogram counts only); waive the floor only for tests, benchmarks and simulations",
                        cfg.min_window_samples, MIN_WINDOW_SAMPLES_FLOOR, d.config_file)
        target = load_device_target(d.target_file)
        updater = Updater(d)
        updater.recover()

        def loader() -> LoadedModel | None:
            active = updater.slots.active()
            return load_model(active[0], target) if active else None

        def probe() -> tuple[str, str] | None:
            p = updater.slots.pointer()
            return None if p is None else (p.slot, p.version)

        outbox = Outbox(d.outbox, cfg.outbox_max_rows, wait_for_space=True)  # a full disk: start, hold windows
        return cls(cfg, target, loader(), sink=outbox, prediction_log=PredictionLog(d.path / "predictions",
                   cfg.prediction_log_max_rows), device_key=load_private_key(d.device_key), model_loader=loader,
                   background=background, active_probe=probe)

    def _install_model(self, model: LoadedModel) -> bool:
        """Serve ``model`` from now on; False (nothing changed) when a batch or a contended prediction is in
        flight, whose result must land in the window of the model that made it. Raises ModelLoadError when the
        model cannot serve (the loaded one, if any, keeps serving)."""
        with self._lock:
            vstats = self._stats_locked(model)
        hot = HotModel(model, vstats, self.log, f"{self._boot}-", self.cfg.image_stats_every)
        window = Window(model.profile, model.calibration, model.validator.lows, model.validator.highs,
                        staging=hot.staging)
        with self._lock, self._swap_lock:
            if self._busy:
                return False
            old = self._close_locked()
            self._model = model
            self._hot = hot
            self._window = window
        if old is not None:
            self.summarizer.submit(old)
        return True

    def reload(self) -> bool:
        """Re-read the active slot (after an install or rollback); True when the model changed.

        While a batch runs (``busy()`` for more than 0.2 s) the loaded model is kept and False returned: the
        ticker tries again every second. Raises ModelLoadError when the active slot cannot be loaded (the old
        model keeps serving).
        """
        if self._model_loader is None:
            return False
        with self._reload_lock:
            cur = self._model
            if cur is not None and self._active_probe is not None:
                try:
                    if self._active_probe() == (cur.slot.name, cur.version):
                        return False  # the pointer still names the loaded model: no need to load it again
                except AgentError:
                    pass  # an unreadable pointer: let the loader decide
            new = self._model_loader()
            cur = self._model
            if new is None or (cur is not None and new.slot == cur.slot and new.version == cur.version):
                return False
            # Contended predictions now queue on the lock instead of running on their own, so those in flight
            # drain; a batch may take longer: then the ticker tries again next second.
            self._swap_pending = True
            try:
                deadline = time.monotonic() + 0.2
                while self._busy and time.monotonic() < deadline:
                    time.sleep(0.001)
                return self._install_model(new)
            finally:
                self._swap_pending = False

    # ---- rollout support: per-version statistics and the busy flag --------------------------------------
    def _stats_locked(self, m: LoadedModel) -> VersionStats:
        key = (m.name, m.version)
        vs = self._vstats.get(key)
        if vs is None:
            vs = self._vstats[key] = VersionStats()
        return vs

    def version_stats(self, name: str, version: str) -> StatsSnapshot:
        """Predictions, inference errors and recent latencies of one version since this agent started."""
        with self._lock:
            self._flush_locked()  # staged latencies reach the ring when the rows are binned
            vs = self._vstats.get((name, version))
            raw = vs.raw() if vs is not None else None
        return VersionStats.snapshot(raw) if raw is not None else StatsSnapshot()

    def busy(self) -> bool:
        """True while a batch runs: a model swap now would split it between two versions."""
        return self._busy > 0

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Mark a batch (``with agent.batch(): …``): ``busy()`` is true inside, and ``reload()`` waits."""
        with self._swap_lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._swap_lock:
                self._busy -= 1

    # ---- hot path --------------------------------------------------------------------------------------
    def predict(self, x: Any) -> Prediction:
        """Predict one input: an array of features, a name -> value mapping, or encoded image bytes.

        Raises InputError (counted in the window; the agent keeps serving), NoModelError, InferenceError.
        """
        t0 = time.perf_counter_ns()
        lock = self._lock
        if not lock.acquire(False):
            if not self._swap_pending:
                return self._predict_contended(x, t0)
            lock.acquire()  # a model swap is waiting for the contended predictions in flight: queue instead
        try:  # the staged path: validated into the bound input and staging rows, run in place, result staged
            hot = self._hot
            if hot is None:
                raise NoModelError("no model installed on this device; install one with `device-agent install`")
            st = hot.staging
            k = st.k
            sampled = None
            try:
                if hot.image is None:
                    if type(x) is not np.ndarray:
                        x = hot.features(x)
                    hot.validator.into(x, hot.input, st.feature_rows[k])
                else:
                    flat, sampled = hot.image_input(x)
                    hot.input[0] = flat  # the runtime's bound input row
            except InputError as exc:
                self._reject_locked(exc.kind, exc.feature)
                raise
            try:
                hot.run()
            except InferenceError:
                self._reject_locked("inference", None)
                hot.vstats.errors += 1
                raise
            lat = time.perf_counter_ns() - t0
            n = next(self._ids)
            st.latency[k] = lat
            st.started[k] = t0
            st.ids[k] = n
            out = hot.output
            probs = out.tolist()[0]
            conf = max(probs)
            ci = probs.index(conf)
            result = out[0].copy()
            st.output_rows[k][...] = out
            if hot.image is None:
                st.nf += 1
            elif sampled is not None:
                hot.hold(sampled)  # its derived statistics are computed when the staged rows are binned
            st.k = k + 1
            self.counters.predictions += 1
            w = self._window
            w.count += 1  # type: ignore[union-attr]  # a model always has a window
            if k + 1 == st.size:
                w.flush()  # type: ignore[union-attr]
            close = w.count >= self._window_count  # type: ignore[union-attr]
        finally:
            lock.release()
        if close:
            self._maybe_close_by_count()
        return Prediction(f"{hot.prefix}{n}", hot.name, hot.version, hot.classes[ci], ci, conf, result, lat / 1e6)

    def _reject(self, kind: str, feature: str | None) -> None:
        with self._lock:
            self._reject_locked(kind, feature)

    def _reject_locked(self, kind: str, feature: str | None) -> None:
        if self._window is not None:
            self._window.reject(kind, feature)
        self.counters.rejected[kind] = self.counters.rejected.get(kind, 0) + 1

    def refuse_feedback(self, reason: str) -> None:
        """Count a refused feedback request (a malformed body, or a label ``feedback`` refused): in ``rejected``,
        not in the window, whose errors are the model's requests (the fleet's error rate is computed from them)."""
        with self._lock:
            self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1

    def flush_staged(self) -> None:
        """Bin the staged rows now, handing them to the prediction log (what another serve worker's feedback asks
        for before it reads this worker's predictions: ``PredictionLog.share``)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """Bin the staged rows now (and hand them to the prediction log and the version's ring)."""
        if self._window is not None:
            self._window.flush()

    # ---- feedback --------------------------------------------------------------------------------------
    def feedback(self, prediction_id: str, label: int | str) -> None:
        """Record ground truth for a logged prediction. When this returns, the label is on disk (fsynced) and
        counted in the window; when it raises, nothing is recorded or counted.

        Raises a FeedbackError subclass for a label that cannot be taken: MalformedPredictionIdError (not an id
        a prediction returns), UnknownPredictionError (never made here, or rotated out of the log),
        UnknownClassError (a class name or index the model does not have), AlreadyLabelledError (labelled
        before, in this run or an earlier one). Each is counted in ``rejected`` under its ``reason`` (not in the
        window: its errors are the model's requests); the two id errors also in ``feedback_unmatched``. Raises
        FeedbackUnavailableError without a model or prediction log, and LabelWriteError (counted; not a
        FeedbackError) when the label cannot be made durable: the same label can be sent again later.
        """
        m = self._model
        if m is None or self.log is None:
            raise FeedbackUnavailableError("feedback needs an installed model and the prediction log; install a "
                                           "model with `device-agent install`, then send the label again")
        with self._lock:
            self._flush_locked()  # a prediction still in the staging rows is not in the log yet
        try:
            found = self.log.lookup(prediction_id)  # MalformedPredictionIdError before any file is read
            if found is None:
                raise UnknownPredictionError(f"unknown prediction id {prediction_id!r}: never made on this device, "
                                             "or rotated out of its prediction log")
            model, version, predicted = found
            if isinstance(label, str) and not _INDEX.fullmatch(label):
                if label not in m.classes:
                    raise UnknownClassError(f"unknown class {label!r}; classes: {list(m.classes)}")
                true = m.classes.index(label)
            else:
                true = int(label)
                if not 0 <= true < len(m.classes):
                    raise UnknownClassError(f"class index {true} is outside 0..{len(m.classes) - 1}; classes: "
                                            f"{list(m.classes)}")
            self.log.set_label(prediction_id, true)  # fsynced; AlreadyLabelledError, LabelWriteError
        except (FeedbackError, LabelWriteError) as exc:
            if isinstance(exc, MalformedPredictionIdError | UnknownPredictionError):
                with self._lock:
                    self.counters.feedback_unmatched += 1
            self.refuse_feedback(exc.reason)
            raise
        with self._lock:
            self.counters.feedback += 1
            if (model, version) == (m.name, m.version) and self._window is not None:
                self._window.label(true, predicted)
            else:
                self.counters.feedback_unmatched += 1

    # ---- windows ---------------------------------------------------------------------------------------
    def _close_locked(self) -> Closed | None:
        if self._model is None or self._window is None:
            return None
        now = utcnow()
        closed = Closed(self._window, self._model.name, self._model.version, fmt(self._window_start), fmt(now))
        staging = self._window.handover()  # bins the staged rows into the closing window: none is lost
        self._window = Window(self._model.profile, self._model.calibration, self._model.validator.lows,
                              self._model.validator.highs, staging=staging)
        self._window_start = now
        self._window_t0 = time.monotonic()
        self.counters.windows_closed += 1
        return closed

    def close_window(self, wait: bool = False) -> None:
        with self._lock:
            closed = self._close_locked()
        if closed is not None:
            if wait:
                closed.done = threading.Event()
            self.summarizer.submit(closed)
            if closed.done is not None:
                closed.done.wait(30)

    def _maybe_close_by_count(self) -> None:
        """Close the window if it is (still) full: two threads may both have seen it fill."""
        with self._lock:
            closed = (self._close_locked() if self._window is not None and self._window.count >= self._window_count
                      else None)
        if closed is not None:
            self.summarizer.submit(closed)

    def tick(self) -> None:
        """Close the window by time (else bin what is staged, so the prediction log lags a second at most) and
        pick up a new active slot; called every second by the ticker thread."""
        if time.monotonic() - self._window_t0 >= self.cfg.window_seconds:
            self.close_window()
        else:
            with self._lock:
                self._flush_locked()
        try:
            self.reload()
        except AgentError:  # keep serving the loaded model; the updater reports the broken slot
            self.reload_failures += 1

    def _tick_loop(self) -> None:
        """Ticks every second until stopped. A tick that raises (a full disk under the prediction log's model
        map, a bug) is logged and counted, never the end of the ticker: without it windows would stop closing by
        time and new slots would not be picked up, silently."""
        while not self._stop.wait(1.0):
            try:
                self.tick()
            except Exception:
                self.tick_failures += 1
                if self.tick_failures in (1, 10, 100) or self.tick_failures % 1000 == 0:
                    log.exception("agent tick failed (%d so far); the ticker goes on", self.tick_failures)

    # ---- status and shutdown ---------------------------------------------------------------------------
    def sign(self, doc: dict[str, Any]) -> dict[str, Any]:
        if self.device_key is None:
            raise AgentError("this agent has no device key to sign with")
        return sign_envelope(doc, self.device_key)

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def status(self) -> dict[str, Any]:
        """What GET /v1/status answers: ``status.device_status_fields`` and ``status.RUNTIME_STATUS_FIELDS``
        (``device-agent status`` shows the same fields)."""
        m = self._model
        runtime = {**self.counter_fields(), "outbox": self._outbox_counters(),
                   "prediction_log": self.log.counters() if self.log is not None else None}
        model = {"name": m.name, "version": m.version} if m else None
        return {**device_status_fields(self.cfg, self.target.name, model, self._epsilon_spent()), **runtime}

    def counter_fields(self) -> dict[str, Any]:
        """The status fields this process counts (since it started) and its held-for-disk gauge; nothing read from
        disk (``worker_stats`` writes these every second under ``serve``)."""
        c, sm = self.counters, self.summarizer
        return {
            "predictions": c.predictions, "rejected": dict(c.rejected), "feedback": c.feedback,
            "feedback_unmatched": c.feedback_unmatched, "windows_closed": c.windows_closed,
            "summaries_emitted": sm.emitted, "windows_held_for_k": sm.held,
            "windows_held_disk_full": sm.windows_held_disk_full, "windows_recovered": sm.windows_recovered,
            "windows_lost": sm.windows_lost, "summarizer_failures": sm.failures,
            "reload_failures": self.reload_failures, "tick_failures": self.tick_failures,
        }

    def _outbox_counters(self) -> dict[str, int] | None:
        """The outbox's depth and write errors (disk full), or None when the sink keeps none or is busy."""
        counters = getattr(self.sink, "counters", None)
        if counters is None:
            return None
        try:
            return dict(counters())
        except Exception:  # noqa: BLE001 - status must answer even if the outbox is busy or unreadable
            return None

    def _epsilon_spent(self) -> float:
        try:
            return float(self.sink.get_meta("epsilon_spent") or 0.0)
        except Exception:  # noqa: BLE001 - status must answer even if the outbox is busy
            return -1.0

    def close(self) -> None:
        """Close the current window (held back if below k), flush the log, stop the threads."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        self.close_window(wait=True)
        self.summarizer.stop()
        if self.log is not None:
            self.log.close()
