"""Label feedback over the local HTTP API: every refusal has a status a client can act on and a stable reason,
and is counted once in ``rejected``. A real agent (real onnxruntime, real prediction log on disk) behind the
real app (``create_app``), driven through Starlette's TestClient; the full disk is a real one for this
process (RLIMIT_FSIZE, see ``test_predlog_faults.disk_full_after``)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.http_api import create_app
from device_agent.predlog import PredictionLog
from edgefleet_contracts.targets import get_target
from tests.device_agent.test_predlog_faults import disk_full_after


@pytest.fixture()
def x(built) -> np.ndarray:
    with np.load(built.holdout) as z:
        return z["x"]


def _predict(client: TestClient, row: np.ndarray) -> dict:
    r = client.post("/v1/predict", json={"inputs": row.tolist()})
    assert r.status_code == 200, r.text
    return r.json()


def _metric(client: TestClient, reason: str) -> int:
    prefix = f'edgefleet_agent_rejected_total{{reason="{reason}"}} '
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return int(lines[0][len(prefix):]) if lines else 0


def test_a_well_formed_id_the_device_does_not_hold_is_a_404_unknown_prediction(agent, x):
    client = TestClient(create_app(agent))
    pid = _predict(client, x[0])["prediction_id"]
    boot, _, counter = pid.rpartition("-")
    r = client.post("/v1/feedback", json={"prediction_id": f"{boot}-{int(counter) + 1000}", "label": 0})
    assert r.status_code == 404 and r.json()["error"] == "unknown_prediction", r.text
    assert agent.counters.rejected == {"unknown_prediction": 1} and _metric(client, "unknown_prediction") == 1
    assert agent.counters.feedback == 0 and agent.counters.feedback_unmatched == 1


def test_an_id_no_prediction_returns_is_a_422_malformed_prediction_id_not_a_404(agent):
    client = TestClient(create_app(agent))
    for bad in ("nope", "../dev-1-5", "dev-1-5 "):
        r = client.post("/v1/feedback", json={"prediction_id": bad, "label": 0})
        assert r.status_code == 422 and r.json()["error"] == "malformed_prediction_id", (bad, r.text)
    assert agent.counters.rejected == {"malformed_prediction_id": 3} and agent.counters.feedback_unmatched == 3


def test_a_second_label_is_a_409_and_the_prediction_is_counted_once(agent, x):
    client = TestClient(create_app(agent))
    p = _predict(client, x[0])
    first = client.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": p["class_index"]})
    assert first.status_code == 200 and first.json() == {"ok": True}
    for label in (1 - p["class_index"], p["class_index"]):  # a different label, then the same one resent
        again = client.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": label})
        assert again.status_code == 409 and again.json()["error"] == "already_labelled", again.text
    assert agent.counters.feedback == 1 and agent.counters.rejected == {"already_labelled": 2}
    assert _metric(client, "already_labelled") == 2 and agent.counters.feedback_unmatched == 0
    agent.close_window(wait=True)
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert s.confusion is not None and sum(map(sum, s.confusion)) == 1  # the first label, once
    assert "already_labelled" not in s.errors  # refused labels are not errors of the model's requests


def test_a_class_the_model_does_not_have_is_a_422_unknown_class(agent, x):
    client = TestClient(create_app(agent))
    pid = _predict(client, x[0])["prediction_id"]
    for label in ("maybe", 7, "-1"):
        r = client.post("/v1/feedback", json={"prediction_id": pid, "label": label})
        assert r.status_code == 422 and r.json()["error"] == "unknown_class", (label, r.text)
    assert agent.counters.rejected == {"unknown_class": 3} and agent.counters.feedback == 0
    assert client.post("/v1/feedback", json={"prediction_id": pid, "label": 1}).status_code == 200  # not taken


def test_feedback_without_a_model_is_a_503_feedback_unavailable(tmp_path):
    target = get_target("x86_64-avx2")
    agent = Agent(DeviceConfig(device_id="dev-1", target=target.name), target, None,
                  prediction_log=PredictionLog(tmp_path / "log"), background=False)
    try:
        r = TestClient(create_app(agent)).post("/v1/feedback", json={"prediction_id": "dev-1.a-1", "label": 0})
        assert r.status_code == 503 and r.json()["error"] == "feedback_unavailable", r.text
    finally:
        agent.close()


def test_a_label_the_disk_refuses_is_a_503_label_not_saved_and_can_be_sent_again(agent, x):
    client = TestClient(create_app(agent))
    p = _predict(client, x[0])
    body = {"prediction_id": p["prediction_id"], "label": p["class_index"]}
    with disk_full_after(0):
        refused = client.post("/v1/feedback", json=body)
    assert refused.status_code == 503 and refused.json()["error"] == "label_not_saved", refused.text
    assert agent.counters.feedback == 0 and agent.counters.rejected == {"label_not_saved": 1}
    assert client.post("/v1/feedback", json=body).status_code == 200  # space again: the same label is taken
    assert agent.counters.feedback == 1


def test_a_malformed_feedback_body_is_counted_but_not_as_an_error_of_the_models_requests(agent, x):
    client = TestClient(create_app(agent))
    _predict(client, x[0])
    for body in ({"prediction_id": 5, "label": 0}, {"label": 0}, {"prediction_id": "a-1", "label": "\u0661"}):
        r = client.post("/v1/feedback", json=body)
        assert r.status_code in (400, 422) and r.json()["error"] == "invalid_feedback", r.text
    assert agent.counters.rejected == {"invalid_feedback": 3}
    agent.close_window(wait=True)
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert s.count == 1 and "invalid_feedback" not in s.errors  # the fleet's error rate is the model's requests
