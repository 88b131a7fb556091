"""Probation: the decision on plain numbers, the agent's per-version counters, and the updater/handler around it —
a version that is slower on this device is rolled back by itself; a rollback that cannot be done says so
distinctly; a watch interrupted by a restart resumes (and a version the agent keeps dying on is rolled back).

"Slower" is real, not injected (no test hook adds latency): ``slow_package`` is the session's clinical model with
200 extra 512x512 layers per row (Tanh(h @ W), about 52 M multiply-adds, result added to the output times zero):
the same predictions, a few milliseconds of real compute per row on this machine instead of tens of
microseconds, so that the regression stands out even when the test machine is loaded. (A (1024, 1024, 1024)
sklearn MLP costs only ~0.2 ms here, which scheduling noise on a loaded 2-CPU runner can hide.)
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.desired_handler import DesiredHandler
from device_agent.errors import InputError
from device_agent.probation import (
    Baseline,
    Observed,
    ProbationConfigError,
    ProbationPolicy,
    ProbationWatch,
    StatsSnapshot,
    decide,
    p95,
)
from device_agent.runner import build_report
from device_agent.updater import InProbationError, Updater, UpdateRecord, UpdateState

from . import only_slots_left, packages, serve
from .test_desired import Traffic, agent_for, desired, last_result, options, provisioned, rows, settle, versions
from .test_download import PackageServer

__all__ = ["agent_for"]  # a fixture shared with test_desired

POLICY = ProbationPolicy(seconds=60, predictions=100, max_error_rate=0.05, latency_ratio=2.0, latency_floor_ms=0.5,
                         min_samples=20)
BASE = Baseline("1.0.0", 1.0, 500)


def seen(predictions: int = 100, errors: int = 0, latency: float = 1.0, n_lat: int | None = None,
         elapsed: float = 1.0, **kw: Any) -> Observed:
    return Observed(predictions, errors, [latency] * (predictions if n_lat is None else n_lat), elapsed, **kw)


# ---- the decision (pure) ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("observed", "baseline", "outcome", "reason", "text"),
    [
        (seen(), BASE, "pass", "probation_passed", "100 predictions, 0 errors; p95 1 ms, 1.00x"),
        (seen(latency=3.1), BASE, "fail", "probation_latency", "p95 latency 3.1x the previous version"),
        (seen(latency=1.9), BASE, "pass", "probation_passed", "1.90x the previous version"),
        (seen(latency=0.28), Baseline("1.0.0", 0.07, 500), "pass", "probation_passed", "under the 0.5 ms floor"),
        (seen(latency=0.6), Baseline("1.0.0", 0.07, 500), "fail", "probation_latency", "8.6x the previous"),
        (seen(predictions=60, errors=40), BASE, "fail", "probation_errors", "error rate 0.40"),
        (seen(predictions=10, errors=10, elapsed=0.1), BASE, "fail", "probation_errors", "10 inference errors in 20"),
        (seen(predictions=5, errors=1, elapsed=0.1), BASE, "watch", "probation", "watching"),
        (seen(predictions=50, elapsed=5), BASE, "watch", "probation", "watching"),
        (seen(predictions=5, elapsed=61, latency=9), BASE, "pass", "probation_passed", "latency not compared"),
        (seen(latency=9), Baseline("1.0.0", 1.0, 3), "pass", "probation_passed", "previous version 3"),
        (seen(latency=9), None, "pass", "probation_passed", "latency not compared"),
        (seen(predictions=0, elapsed=61), BASE, "pass", "probation_passed", "no traffic"),
        (seen(predictions=0, elapsed=61, serving=False), BASE, "fail", "probation_not_serving", "did not serve"),
        (seen(smoke_passed=False), BASE, "fail", "probation_smoke", "smoke test"),
    ],
)
def test_the_probation_decision(observed, baseline, outcome, reason, text):
    v = decide(POLICY, observed, baseline)
    assert (v.outcome, v.reason) == (outcome, reason), v.message
    assert text in v.message


def test_p95_is_the_nearest_rank_and_snapshots_count_from_the_watch_start():
    assert p95(list(range(1, 101))) == 95 and p95([7.0]) == 7.0 and np.isnan(p95([]))
    start = StatsSnapshot(10, 1, 10, tuple(float(i) for i in range(10)))
    later = StatsSnapshot(15, 3, 17, tuple(float(i) for i in range(17)))
    assert later.since(start) == StatsSnapshot(5, 2, 7, (10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0))


def test_the_watch_ends_on_time_or_on_the_prediction_count_whichever_first():
    now = [0.0]
    counts = [StatsSnapshot()]
    watch = ProbationWatch(ProbationPolicy(seconds=10, predictions=50, min_samples=5), BASE, lambda: counts[0],
                           clock=lambda: now[0])
    assert watch.poll().outcome == "watch"
    counts[0] = StatsSnapshot(50, 0, 50, (0.5,) * 50)
    assert watch.poll().outcome == "pass"  # by count, long before 10 s
    counts[0] = StatsSnapshot(52, 0, 52, (0.5,) * 52)
    timed = ProbationWatch(ProbationPolicy(seconds=10, predictions=50, min_samples=5), BASE, lambda: counts[0],
                           clock=lambda: now[0])
    now[0] = 10.0
    assert timed.poll().outcome == "pass"  # by time, with 0 predictions since its start


@pytest.mark.parametrize("bad", [dict(seconds=0), dict(predictions=0), dict(max_error_rate=1.0),
                                 dict(latency_ratio=0.5), dict(latency_floor_ms=-1), dict(min_samples=0)])
def test_a_bad_probation_parameter_is_refused(bad):
    with pytest.raises(ProbationConfigError):
        ProbationPolicy(**bad)


# ---- the agent's per-version counters -----------------------------------------------------------------------
def test_input_rejections_are_the_callers_fault_and_not_counted_as_model_errors(built, tmp_path, agent_for):
    dev = provisioned(built, tmp_path / "dev", package=packages(built).v100)
    agent = agent_for(dev)
    x = rows(built)
    for row in x[:30]:
        agent.predict(row)
    for bad in (x[0][:5], np.full(30, np.nan, np.float32), "text"):
        with pytest.raises(InputError):
            agent.predict(bad)
    agent.predict_batch(x[:10])
    s = agent.version_stats("clinical", "1.0.0")
    assert (s.predictions, s.errors, s.seen, len(s.latencies_ms)) == (40, 0, 40, 40)
    assert all(v > 0 for v in s.latencies_ms) and agent.counters.rejected  # rejections counted elsewhere
    assert agent.version_stats("clinical", "9.9.9") == StatsSnapshot()


# ---- a slower version, end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_package(built, tmp_path_factory) -> Path:
    """clinical 3.0.0: the clinical model plus 200 layers of Tanh(h @ W) (512 wide) whose result is added to the
    probabilities times zero. Same outputs (so its smoke test passes), far more compute; re-signed with the real
    signing key."""
    from tests.conftest import slow_onnx

    from . import repack, signing_key

    model = slow_onnx(built.model, layers=200)
    return repack(packages(built).v110, tmp_path_factory.mktemp("slow") / "clinical-3.0.0.efpkg",
                  signing_key(built.keys), files={"model.onnx": model},
                  mutate=lambda s: s.update(version="3.0.0"))


def test_a_version_slower_on_this_device_is_rolled_back_automatically(built, tmp_path, slow_package, agent_for):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    agent = agent_for(dev)
    data = slow_package.read_bytes()
    with PackageServer() as srv:
        url = srv.add("clinical-3.0.0", data)
        h = DesiredHandler(dev, agent=agent, options=options(
            policy=ProbationPolicy(seconds=10, predictions=150, min_samples=50)))
        with Traffic(agent, rows(built)) as app:
            time.sleep(0.5)  # the previous version serves a while: its p95 on this device is the baseline
            assert h.receive(desired(1, "3.0.0", url, data, reason="stage 1")).kind == "accepted"
            settle(h)
            deadline = time.monotonic() + 10  # a prediction in flight during the switch may still finish on 3.0.0
            while app.served[-1] != "1.0.0" and time.monotonic() < deadline:
                time.sleep(0.01)
    last = last_result(dev)
    assert (last["status"], last["reason"], last["version"]) == ("rolled_back", "probation_latency", "1.0.0")
    assert last["message"].startswith("probation: p95 latency ") and "x the previous version" in last["message"]
    assert last["details"]["latency_ratio"] > 2.0 and last["details"]["baseline"]["version"] == "1.0.0"
    assert "rolled back from clinical 3.0.0 to clinical 1.0.0" in last["message"]
    assert last["details"]["from"] == {"name": "clinical", "version": "3.0.0"}  # what the server's gate counts
    assert versions(dev) == ("1.0.0", "3.0.0") and serve(dev) == "1.0.0" and only_slots_left(dev)
    assert "3.0.0" in app.served and app.served[-1] == "1.0.0"  # it did serve, then the agent switched back
    rep = build_report(dev)
    assert (rep.update_state, rep.desired_seq, rep.last_result["status"]) == ("idle", 1, "rolled_back")  # type: ignore[index]
    assert h.record().outcome["final"] is True  # type: ignore[index]  # not tried again for this seq
    assert settle(h).what.startswith("seq 1 done")


# ---- the updater around probation ---------------------------------------------------------------------------
@pytest.fixture
def on_probation(built, tmp_path) -> Any:
    """A device with 1.0.0 that activated 1.1.0 on probation (standby 1.0.0)."""
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    r = Updater(dev).install(pk.v110, probation=ProbationPolicy(seconds=0.5).to_dict())
    assert (r.status, r.version) == ("probation", "1.1.0")
    assert UpdateRecord.load(dev.update_file).state == UpdateState.PROBATION
    return dev


def test_a_rollback_that_fails_is_reported_as_rollback_failed(on_probation):
    dev = on_probation
    (dev.slot("a") / "model.onnx").write_bytes(b"bit rot")  # the standby was damaged meanwhile
    r = Updater(dev).finish_probation(False, "probation_errors", "probation: error rate 0.40 (4 inference errors in 10 "
                                      "predictions, limit 0.05)")
    assert r is not None and (r.status, r.reason) == ("rollback_failed", "file_mismatch")
    assert r.message.startswith("probation: error rate 0.40") and "the rollback failed" in r.message
    assert r.details["rollback_reason"] == "probation_errors" and not r.ok
    assert r.version == "1.1.0" and r.details["from"] == {"name": "clinical", "version": "1.1.0"}
    assert serve(dev) == "1.1.0"  # still serving: there is nothing sound to go back to
    rec = UpdateRecord.load(dev.update_file)
    assert rec.state == UpdateState.IDLE and rec.last_result["status"] == "rollback_failed"  # type: ignore[index]


def test_install_is_refused_on_probation_but_an_operator_rollback_ends_it(built, on_probation):
    dev = on_probation
    with pytest.raises(InProbationError, match="on probation"):
        Updater(dev).install(packages(built).v200)
    assert Updater(dev).recover() == [] and UpdateRecord.load(dev.update_file).state == UpdateState.PROBATION
    r = Updater(dev).rollback()
    assert (r.status, r.version) == ("rolled_back", "1.0.0") and serve(dev) == "1.0.0"
    assert Updater(dev).finish_probation(True, "probation_passed", "late") is None  # the watch finds it over


def test_an_interrupted_probation_is_resumed_after_a_restart_and_commits(on_probation, agent_for):
    dev = on_probation
    agent = agent_for(dev)  # a restarted agent: Agent.open recovers, the probation stays
    h = DesiredHandler(dev, agent=agent, options=options())
    step = h.converge()
    assert step.result is not None and step.result.status == "committed"
    assert step.result.details["resumes"] == 1 and serve(dev) == "1.1.0"


def test_an_agent_that_keeps_dying_during_probation_rolls_back(on_probation):
    dev = on_probation
    rec = UpdateRecord.load(dev.update_file)
    rec.candidate["probation"]["resumes"] = 2  # type: ignore[index]  # restarted twice already
    dev.update_file.write_text(rec.to_json())
    step = DesiredHandler(dev, options=options()).converge()
    assert step.result is not None and (step.result.status, step.result.reason) == ("rolled_back", "probation_restarts")
    assert "restarted 3 times during the probation of clinical 1.1.0" in step.result.message
    assert serve(dev) == "1.0.0"


def test_a_rollback_out_of_probation_killed_midway_is_completed_at_start_up(on_probation):
    dev = on_probation
    rec = UpdateRecord.load(dev.update_file)  # as a SIGKILL right after entering rolling_back leaves it
    rec.state = UpdateState.ROLLING_BACK
    rec.candidate = {"name": "clinical", "version": "1.0.0", "slot": "a",
                     "rollback": {"reason": "probation_latency", "message": "probation: p95 latency 3.0x the previous "
                                  "version", "details": {}, "from_probation": True, "from": "clinical 1.1.0"}}
    dev.update_file.write_text(rec.to_json())
    actions = Updater(dev).recover()
    assert any("completed the rollback out of probation" in a for a in actions)
    last = last_result(dev)
    assert (last["status"], last["reason"]) == ("rolled_back", "probation_latency") and serve(dev) == "1.0.0"


def test_a_newer_desired_state_for_the_previous_version_ends_the_probation_at_once(built, tmp_path, agent_for):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    agent = agent_for(dev)
    data = pk.v110.read_bytes()
    with PackageServer() as srv:
        url = srv.add("clinical-1.1.0", data)
        h = DesiredHandler(dev, agent=agent, options=options(policy=ProbationPolicy(seconds=60, predictions=10**6)))
        h.receive(desired(1, "1.1.0", url, data))
        worker = threading.Thread(target=settle, args=(h, 30), daemon=True)
        worker.start()
        deadline = time.monotonic() + 20
        while UpdateRecord.load(dev.update_file).state != UpdateState.PROBATION:
            assert time.monotonic() < deadline, "never reached probation"
            time.sleep(0.02)
        t0 = time.monotonic()
        assert h.receive(desired(2, "1.0.0", url, pk.v100.read_bytes(), reason="rollout aborted")).kind == "accepted"
        worker.join(20)
    assert not worker.is_alive() and time.monotonic() - t0 < 5  # not after the 60 s watch
    last = last_result(dev)
    assert (last["status"], last["reason"], last["version"]) == ("rolled_back", "desired_rollback", "1.0.0")
    assert "desired state seq 2 asks for clinical 1.0.0 (rollout aborted)" in last["message"]
    assert json.loads((dev.path / "desired.json").read_text())["outcome"]["status"] == "current"
    assert serve(dev) == "1.0.0"


# ---- a version that errors on this device's traffic, end to end -------------------------------------------
@pytest.fixture(scope="module")
def erroring_package(built, tmp_path_factory) -> Path:
    """clinical 4.0.0: the tiny model plus a Gather whose index goes out of bounds (onnxruntime raises) for rows
    whose first feature lies in the widest gap between the golden rows' values. Its smoke test passes; live traffic
    errors. Re-signed with the real signing key (a real package, not a hook)."""
    import io

    import onnx
    from onnx import TensorProto, helper

    from . import members, repack, signing_key

    golden = next(d for m, d in members(packages(built).v110) if m.name == "golden.npz")
    with np.load(io.BytesIO(golden)) as z:
        values = np.sort(z["x"][:, 0])
    widest = int(np.argmax(np.diff(values)))
    lo, hi = float(values[widest]), float(values[widest + 1])
    model = onnx.load(str(built.model))
    g = model.graph
    for node in g.node:  # the original probabilities become an intermediate; every consumer reads that
        node.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in node.output]
        node.input[:] = ["probabilities_raw" if i == "probabilities" else i for i in node.input]
    x = g.input[0].name
    g.node.extend([
        helper.make_node("Constant", [], ["col0"], value=helper.make_tensor("c0", TensorProto.INT64, [1], [0])),
        helper.make_node("Gather", [x, "col0"], ["first"], axis=1),
        helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("l", TensorProto.FLOAT, [], [lo])),
        helper.make_node("Constant", [], ["hi"], value=helper.make_tensor("h", TensorProto.FLOAT, [], [hi])),
        helper.make_node("Greater", ["first", "lo"], ["above"]),
        helper.make_node("Less", ["first", "hi"], ["below"]),
        helper.make_node("And", ["above", "below"], ["inside"]),
        helper.make_node("Cast", ["inside"], ["above_i"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["five"], value=helper.make_tensor("f", TensorProto.INT64, [], [5])),
        helper.make_node("Mul", ["above_i", "five"], ["idx"]),
        helper.make_node("Constant", [], ["table"], value=helper.make_tensor("z", TensorProto.FLOAT, [2], [0, 0])),
        helper.make_node("Gather", ["table", "idx"], ["zero"]),  # index 5 of 2: out of bounds inside the gap
        helper.make_node("Add", ["probabilities_raw", "zero"], ["probabilities"]),
    ])
    onnx.checker.check_model(model)
    return repack(packages(built).v110, tmp_path_factory.mktemp("erroring") / "clinical-4.0.0.efpkg",
                  signing_key(built.keys), files={"model.onnx": model.SerializeToString()},
                  mutate=lambda s: s.update(version="4.0.0"))


def test_a_version_that_errors_on_this_devices_traffic_is_rolled_back(built, tmp_path, erroring_package, agent_for):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    agent = agent_for(dev)
    data = erroring_package.read_bytes()
    with PackageServer() as srv:
        url = srv.add("clinical-4.0.0", data)
        h = DesiredHandler(dev, agent=agent, options=options(policy=ProbationPolicy(seconds=10, predictions=400)))
        with Traffic(agent, rows(built)):
            time.sleep(0.2)
            h.receive(desired(1, "4.0.0", url, data))
            settle(h)
    last = last_result(dev)
    assert (last["status"], last["reason"], last["version"]) == ("rolled_back", "probation_errors", "1.0.0")
    assert last["message"].startswith("probation: error rate ") and last["details"]["errors"] > 0
    assert agent.version_stats("clinical", "4.0.0").errors >= last["details"]["errors"]  # the agent counted them
    assert agent.counters.rejected.get("inference", 0) >= last["details"]["errors"]
    assert serve(dev) == "1.0.0" and versions(dev) == ("1.0.0", "4.0.0")
