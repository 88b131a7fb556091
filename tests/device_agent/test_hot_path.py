"""The agent's hot path: staging rows, in-place runtime bindings, deferred binning and image statistics.

Everything the hot path defers (binning, the prediction log, the probation latencies, image statistics) must
still account for every prediction: these tests close windows, swap models and race threads around a partly
filled staging buffer and count what comes out. Real packages, real onnxruntime and LiteRT, no mocks.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent import imaging
from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.errors import InputError
from device_agent.hotpath import HELD_IMAGE_BYTES
from device_agent.model import load_model
from device_agent.predlog import PredictionLog
from device_agent.runtime import LiteRtRuntime
from device_agent.window import BATCH, Staging, Window
from edgefleet_contracts.targets import get_target
from tests.conftest import extract

from . import packages

TARGET = get_target("x86_64-avx2")
LITERT_FIXTURE = Path(__file__).resolve().parents[2] / "model_packager" / "fixtures" / "digits_int8.tflite"


def _agent(model, tmp_path, **cfg) -> Agent:
    c = DeviceConfig(device_id="dev-1", target=TARGET.name,
                     **{"min_window_samples": 1, "allow_small_windows": True, "window_count": 10**6,
                        "window_seconds": 10**6, **cfg})
    return Agent(c, TARGET, model, prediction_log=PredictionLog(tmp_path / "log"), background=False)


# ---- deferred binning loses nothing --------------------------------------------------------------------------
def test_rows_still_staged_when_the_window_closes_are_in_its_summary(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    n = 2 * BATCH + 44  # two binned batches and 44 rows still staged
    x = rows[:n]
    for r in x:
        agent.predict(r)
    assert agent._window is not None and agent._window.staging is not None
    assert agent._window.staging.k == 44  # not binned yet: the hot path only staged them
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert s.count == n and sum(s.class_counts) == n and sum(s.latency_counts) == n
    assert sum(s.confidence_counts) == n
    assert all(sum(f.counts) == f.n == n for f in s.features)
    np.testing.assert_allclose([f.sum for f in s.features], x.astype(np.float64).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose([f.sumsq for f in s.features], (x.astype(np.float64) ** 2).sum(axis=0), rtol=1e-5)
    assert agent.log is not None and agent.log.count() == n  # and every one reached the prediction log
    agent.close()


def test_the_one_second_tick_bins_staged_rows_and_logs_them(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    for r in rows[:5]:
        agent.predict(r)
    assert agent.log is not None and agent.log.count() == 0  # staged, not logged yet
    agent.tick()  # the window is not due: only the staged rows are binned
    assert agent._window is not None and agent._window.staging is not None and agent._window.staging.k == 0
    assert agent._window.count == 5 and agent.log.count() == 5 and agent.counters.windows_closed == 0
    agent.close()


def test_feedback_and_probation_stats_see_a_prediction_that_is_still_staged(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    preds = [agent.predict(r) for r in rows[:3]]
    agent.feedback(preds[-1].prediction_id, preds[-1].class_index)
    s = agent.version_stats("clinical", "1.0.0")
    assert (s.predictions, s.seen, len(s.latencies_ms)) == (3, 3, 3)
    np.testing.assert_allclose(s.latencies_ms, [p.latency_ms for p in preds])
    assert agent.log is not None and agent.log.lookup(preds[0].prediction_id) == ("clinical", "1.0.0",
                                                                               preds[0].class_index)
    agent.close_window(wait=True)
    assert agent.sink.summaries[-1].confusion is not None  # type: ignore[attr-defined]
    agent.close()


def test_a_model_swap_bins_the_old_models_staged_rows_into_its_own_summary(built, clinical, rows, tmp_path):
    v110 = load_model(extract(packages(built).v110, tmp_path / "slot110", built.keys / "root.pub"), TARGET)
    c = DeviceConfig(device_id="dev-1", target=TARGET.name, min_window_samples=1, allow_small_windows=True,
                     window_count=10**6, window_seconds=10**6)
    agent = Agent(c, TARGET, clinical, prediction_log=PredictionLog(tmp_path / "log"), background=False,
                  model_loader=lambda: v110)
    for r in rows[:10]:
        agent.predict(r)
    assert agent.reload()
    for r in rows[:7]:
        assert agent.predict(r).version == "1.1.0"
    agent.close()
    by_version = {s.version: s.count for s in agent.sink.summaries}  # type: ignore[attr-defined]
    assert by_version == {"1.0.0": 10, "1.1.0": 7}
    assert agent.log is not None and agent.log.count() == 17


# ---- validation into the staging row ---------------------------------------------------------------------
def test_validating_into_a_row_accepts_what_row_accepts_and_names_the_same_bad_feature(clinical, rows):
    v = clinical.validator
    good = rows[0]
    out = np.empty((1, v.width), np.float32)
    for x in (good, good[None, :], good.astype(np.float64), good.tolist(), good.astype(">f4")):
        out[...] = np.nan
        v.into(x, out)
        np.testing.assert_array_equal(out, v.row(x))
    for value, message in ((np.nan, "is NaN"), (np.inf, "is outside its valid range"),
                           (float(v.highs[4]) * 2 + 1, "is outside its valid range")):
        bad = good.copy()
        bad[4] = value
        with pytest.raises(InputError, match=message) as a:
            v.into(bad, out)
        with pytest.raises(InputError, match=message) as b:
            v.row(bad)
        assert a.value.feature == b.value.feature == v.names[4]
    with pytest.raises(InputError, match="shape \\[2, 30\\]"):
        v.into(rows[:2], out)


# ---- runtime bindings --------------------------------------------------------------------------------------
def test_onnxruntime_runners_read_and_write_the_bound_rows_in_place(clinical, rows):
    rt = clinical.runtime
    ins = np.zeros((4, rt.session.get_inputs()[0].shape[1]), np.float32)  # type: ignore[attr-defined]
    outs = np.zeros((4, len(clinical.classes)), np.float32)
    runners = rt.bind([ins[i : i + 1] for i in range(4)], [outs[i : i + 1] for i in range(4)])
    assert rt.binding == "iobinding"  # type: ignore[attr-defined]
    for i in range(4):
        ins[i] = rows[10 + i]  # written after binding: the runner must read the new values
        runners[i]()
    np.testing.assert_array_equal(outs, rt.run(rows[10:14]))


def test_rows_onnxruntime_cannot_bind_get_copying_runners_that_are_just_as_right(clinical, rows):
    rt = clinical.runtime
    ins = [rows[i : i + 1].astype(np.float64) for i in range(3)]  # float64: not bindable as the float input
    outs = [np.zeros((1, len(clinical.classes)), np.float32) for _ in range(3)]
    runners = rt.bind(ins, outs)
    assert rt.binding == "copying"  # type: ignore[attr-defined]
    for r in runners:
        r()
    np.testing.assert_allclose(np.concatenate(outs), rt.run(rows[:3]), rtol=1e-6)


def test_litert_runners_follow_the_same_contract():
    from sklearn.datasets import load_digits

    x = (load_digits().data[:3] / 16.0).astype(np.float32)
    rt = LiteRtRuntime(LITERT_FIXTURE)
    ins = [x[i : i + 1].copy() for i in range(3)]
    outs = [np.zeros((1, 10), np.float32) for _ in range(3)]
    for r in rt.bind(ins, outs):
        r()
    np.testing.assert_array_equal(np.concatenate(outs), rt.run(x))


# ---- threads ------------------------------------------------------------------------------------------------
def test_a_caller_that_finds_predict_busy_runs_on_its_own_arrays_and_is_still_summarised(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    expected = clinical.runtime.run(rows[:1])[0]
    got: list = []
    agent._lock.acquire()  # another caller is "inside predict"
    try:
        t = threading.Thread(target=lambda: got.append(agent.predict(rows[0])))
        t.start()
        t.join(0.5)  # it validates and runs without the lock, then waits only to stage its row
        assert t.is_alive()
    finally:
        agent._lock.release()
    t.join(5)
    np.testing.assert_allclose(got[0].probabilities, expected, rtol=1e-6)
    assert agent.counters.contended == 1
    agent.close_window(wait=True)
    assert agent.sink.summaries[-1].count == 1  # type: ignore[attr-defined]
    agent.close()


def test_an_image_caller_that_finds_predict_busy_is_summarised_with_its_statistics(vision, vision_built, tmp_path):
    agent = _agent(vision, tmp_path)
    png = sorted(vision_built.holdout.glob("*/*.png"))[0].read_bytes()
    alone = agent.predict(png)  # image 1: sampled
    got: list = []
    agent._lock.acquire()
    try:
        t = threading.Thread(target=lambda: got.append(agent.predict(png)))  # image 2: not sampled
        t.start()
        t.join(0.5)
    finally:
        agent._lock.release()
    t.join(5)
    np.testing.assert_allclose(got[0].probabilities, alone.probabilities, rtol=1e-6)
    for _ in range(3):  # images 3, 4, then 5: sampled
        agent.predict(png)
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert agent.counters.contended == 1 and s.count == 5 and all(f.n == 2 for f in s.features)
    agent.close()


def test_threads_predicting_at_once_get_their_own_results_and_every_prediction_is_counted(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    expected = clinical.runtime.run(rows)
    per_thread, threads = 150, 4
    wrong: list[int] = []
    ids: list[str] = []

    def work(offset: int) -> None:
        for i in range(per_thread):
            j = (offset * 37 + i) % len(rows)
            p = agent.predict(rows[j])
            ids.append(p.prediction_id)
            if not np.allclose(p.probabilities, expected[j], rtol=1e-5):
                wrong.append(j)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    total = per_thread * threads
    assert not wrong and len(set(ids)) == total
    agent.close()
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert s.count == total and all(f.n == total for f in s.features)
    assert agent.log is not None and agent.log.count() == total


# ---- images -------------------------------------------------------------------------------------------------
def test_image_statistics_are_computed_when_rows_are_binned_with_the_reference_function(vision, vision_built,
                                                                                         tmp_path):
    agent = _agent(vision, tmp_path)
    pngs = [p.read_bytes() for p in sorted(vision_built.holdout.glob("*/*.png"))[:9]]
    for data in pngs:
        agent.predict(data)
    assert agent._window is not None and agent._window.staging is not None
    assert len(agent._window.staging.images) == 3  # images 0, 4 and 8 sampled (1 in 4), held until binning
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    spec = vision.manifest.input.image
    stats = np.array([imaging.image_stats(imaging.decode(pngs[i], spec)) for i in (0, 4, 8)])
    assert s.count == 9 and all(f.n == 3 for f in s.features)
    np.testing.assert_allclose([f.sum for f in s.features], stats.sum(axis=0), rtol=1e-6)  # staged as float32
    agent.close()


def test_a_large_image_is_not_held_its_statistics_are_computed_at_once(vision, tmp_path):
    agent = _agent(vision, tmp_path)
    big = np.tile(np.arange(256, dtype=np.uint8), (HELD_IMAGE_BYTES // 256 + 1, 1))  # > the held-bytes cap
    ok, png = cv2.imencode(".png", big)
    assert ok
    agent.predict(png.tobytes())
    st = agent._window.staging if agent._window is not None else None
    assert st is not None and st.images == [] and st.image_bytes == 0 and st.nf == 1
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert s.features[0].sum == pytest.approx(float(big.mean()))
    agent.close()


def test_statistics_that_fail_are_counted_and_the_window_still_closes(vision, vision_built, tmp_path):
    agent = _agent(vision, tmp_path)
    png = sorted(vision_built.holdout.glob("*/*.png"))[0].read_bytes()
    agent.predict(png)  # sampled: its decoded image is held
    hot = agent._hot
    assert hot is not None
    hot.staging.images.append(np.zeros((4, 4, 7), np.uint8))  # what cv2 cannot take statistics of
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert s.count == 1 and all(f.n == 1 for f in s.features) and hot.flush_failures == 1
    agent.close()


def test_an_image_model_refuses_numbers_with_a_clear_error(vision, tmp_path):
    agent = _agent(vision, tmp_path)
    with pytest.raises(InputError, match="takes an encoded image") as e:
        agent.predict(np.zeros(64, np.float32))
    assert e.value.kind == "wrong_shape" and agent.counters.rejected == {"wrong_shape": 1}
    agent.close()


# ---- the window and its staging rows ------------------------------------------------------------------------
def test_a_window_hands_its_staging_rows_to_the_next_and_stops_staging(clinical, rows):
    m = clinical
    w1 = Window(m.profile, m.calibration, m.validator.lows, m.validator.highs)
    probs = m.runtime.run(rows[:5])
    for i in range(3):
        w1.observe(rows[i], probs[i], 1000)
    st = w1.handover()
    assert w1.staging is None and st.k == 0 and w1.count == 3 and int(w1.n[0]) == 3
    w1.flush()  # a no-op now: the summariser thread may call it after the handover
    w2 = Window(m.profile, m.calibration, m.validator.lows, m.validator.highs, staging=st)
    for i in range(3, 5):
        w2.observe(rows[i], probs[i], 1000)
    w2.flush()
    assert (w1.count, w2.count, int(w2.n[0]), int(w1.class_counts.sum())) == (3, 2, 2, 3)
    with pytest.raises(ValueError, match="staging rows are \\[3 features"):
        Window(m.profile, m.calibration, m.validator.lows, m.validator.highs, staging=Staging(3, 2))


def test_the_prediction_log_takes_blocks_and_single_records_in_one_flush(tmp_path):
    log = PredictionLog(tmp_path / "log", flush_seconds=3600)
    log.set_boot("b")
    idx = log.model_index("clinical", "1.0.0")
    log.record_many(np.arange(1, 6), np.full(5, 1.7e9), idx, np.array([0, 1, 1, 0, 1]), np.full(5, 0.9))
    log.record(6, 1.7e9, idx, 0, 0.8)
    assert log.count() == 6
    assert log.lookup("b-4") == ("clinical", "1.0.0", 0) and log.lookup("b-6") == ("clinical", "1.0.0", 0)
    assert log.lookup("b-2") == ("clinical", "1.0.0", 1) and log.lookup("b-7") is None
    log.close()


def test_threads_racing_model_swaps_lose_no_prediction_from_the_summaries(built, clinical, rows, tmp_path):
    """Four threads predict while the model is swapped back and forth: every prediction is counted in the
    window of the version that made it (a contended prediction in flight makes the swap wait for it)."""
    v110 = load_model(extract(packages(built).v110, tmp_path / "slot110", built.keys / "root.pub"), TARGET)
    models = [v110, clinical]
    c = DeviceConfig(device_id="dev-1", target=TARGET.name, min_window_samples=1, allow_small_windows=True,
                     window_count=10**6, window_seconds=10**6)
    agent = Agent(c, TARGET, clinical, prediction_log=PredictionLog(tmp_path / "log"), background=False,
                  model_loader=lambda: models[0])
    made: dict[str, int] = {"1.0.0": 0, "1.1.0": 0}
    stop = threading.Event()
    lock = threading.Lock()

    def serve() -> None:
        local = {"1.0.0": 0, "1.1.0": 0}
        i = 0
        while not stop.is_set() and i < 20_000:  # bounded
            local[agent.predict(rows[i % len(rows)]).version] += 1
            i += 1
        with lock:
            for k, v in local.items():
                made[k] += v

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    for _ in range(20):  # swap 1.1.0 <-> 1.0.0 while the threads run
        threading.Event().wait(0.02)
        if agent.reload():
            swaps += 1
            models.reverse()
    stop.set()
    for t in threads:
        t.join(30)
    agent.close()
    assert swaps >= 10, f"the swap starved behind the contended predictions ({swaps} of 20)"
    assert agent.counters.contended > 0, "the threads never contended: the race was not exercised"
    counted: dict[str, int] = {"1.0.0": 0, "1.1.0": 0}
    for s in agent.sink.summaries:  # type: ignore[attr-defined]
        counted[s.version] += s.count
    assert counted == made and sum(made.values()) == agent.counters.predictions
