"""The local HTTP API and the batch key-value pattern, against a real agent and a real package."""

from __future__ import annotations

import base64
import csv

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.agent import Agent
from device_agent.batch import BatchError, KVStore, run_batch
from device_agent.config import DeviceConfig
from device_agent.http_api import create_app
from device_agent.model import load_model
from edgefleet_contracts.targets import get_target
from tests.conftest import extract

TARGET = get_target("x86_64-avx2")


@pytest.fixture()
def rows(built):
    with np.load(built.holdout) as z:
        return z["x"], z["y"]


def test_predict_by_named_features_then_feedback(agent, rows):
    client = TestClient(create_app(agent))
    x, y = rows
    names = agent.model.validator.names
    r = client.post("/v1/predict", json={"features": dict(zip(names, map(float, x[0]), strict=True))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "clinical" and body["version"] == "1.0.0" and len(body["probabilities"]) == 2
    ok = client.post("/v1/feedback", json={"prediction_id": body["prediction_id"], "label": int(y[0])})
    assert ok.status_code == 200 and agent.counters.feedback == 1
    assert client.post("/v1/feedback", json={"prediction_id": "nope", "label": 1}).status_code == 422  # not an id
    assert client.post("/v1/feedback", json={"prediction_id": "dev-1.0-999999", "label": 1}).status_code == 404


def test_bad_requests_get_clear_errors_and_counters(agent, rows):
    client = TestClient(create_app(agent, max_body_bytes=10_000))
    x, _ = rows
    names = agent.model.validator.names
    fields = dict(zip(names, map(float, x[0]), strict=True))
    del fields[names[4]]
    r = client.post("/v1/predict", json={"features": fields})
    assert r.status_code == 422 and r.json()["error"] == "missing_field" and r.json()["feature"] == names[4]
    r = client.post("/v1/predict", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
    r = client.post("/v1/predict", json={"inputs": [1.0] * 3})
    assert r.status_code == 422 and r.json()["error"] == "wrong_shape"
    r = client.post("/v1/predict", json={"inputs": [0.0] * 30, "image_b64": "AA=="})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = client.post("/v1/predict", content=b"[" + b"1," * 20_000 + b"1]")
    assert r.status_code == 413
    metrics = client.get("/metrics").text
    assert 'edgefleet_agent_rejected_total{reason="missing_field"} 1' in metrics
    assert 'edgefleet_agent_rejected_total{reason="invalid_json"} 1' in metrics  # counted as it was answered
    assert 'edgefleet_agent_rejected_total{reason="invalid_input"} 1' in metrics  # the "exactly one" body only
    assert client.post("/v1/predict", json={"inputs": [float(v) for v in x[1]]}).status_code == 200


def test_a_body_without_an_input_field_lists_every_field_accepted_instances_included(agent):
    """The refusal named 'features', 'inputs' and 'image_b64' only, although 'instances' is accepted too."""
    client = TestClient(create_app(agent))
    for body in ({}, {"feature": {}}, {"inputs": [1.0], "features": {}}):
        r = client.post("/v1/predict", json=body)
        assert r.status_code == 422 and r.json()["error"] == "invalid_input"
        detail = r.json()["detail"]
        for name in ("'features'", "'inputs'", "'image_b64'", "'instances'"):
            assert name in detail, (name, detail)
    assert r.json()["detail"].endswith("the request body has 'features', 'inputs'")
    r = client.post("/v1/predict", json=[1.0, 2.0])
    assert r.status_code == 422 and r.json()["detail"].startswith("the request body must be a JSON object: give "
                                                                  "exactly one of 'features'")
    # inside "instances" another "instances" is not accepted, and the refusal does not offer it
    r = client.post("/v1/predict", json={"instances": [{}, {"instances": []}, 5]})
    errors = [p["detail"] for p in r.json()["predictions"]]
    assert all("'features'" in d and "'image_b64'" in d and "or 'instances' (" not in d for d in errors), errors
    assert errors[0].endswith("each instance has no field") and errors[1].endswith("each instance has 'instances'")
    assert errors[2].startswith("each instance must be a JSON object")


def test_a_batch_csv_without_a_key_column_names_the_columns_it_has(agent, tmp_path):
    (tmp_path / "nokey.csv").write_text("id,mean_radius,label\n1,2,0\n")
    with pytest.raises(BatchError, match=r"needs a 'key' column naming each row; its header has 'id', "
                                         r"'mean_radius', 'label'$"):
        run_batch(agent, tmp_path / "nokey.csv", KVStore(tmp_path / "kv.sqlite"))


def test_instances_batch_keeps_good_results_beside_errors(agent, rows):
    client = TestClient(create_app(agent))
    x, _ = rows
    insts = [{"inputs": [float(v) for v in x[i]]} for i in range(3)] + [{"inputs": [float("nan")] * 30}]
    r = client.post("/v1/predict", content=str({"instances": insts}).replace("'", '"').replace("nan", "NaN"))
    preds = r.json()["predictions"]
    assert [("error" in p) for p in preds] == [False, False, False, True]
    assert preds[3]["error"] == "nan"


def test_batch_precomputes_into_the_store_and_the_api_serves_by_key(agent, rows, tmp_path):
    x, _ = rows
    names = agent.model.validator.names
    path = tmp_path / "batch.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", *names])
        for i in range(25):
            w.writerow([f"patient-{i}", *map(float, x[i])])
        w.writerow(["broken", *(["x"] + [0.0] * 29)])
    store = KVStore(tmp_path / "kv.sqlite")
    counts = run_batch(agent, path, store)
    assert counts == {"stored": 25, "rejected": 1} and store.count() == 26
    client = TestClient(create_app(agent, store))
    r = client.get("/v1/precomputed/patient-3").json()
    assert r["version"] == "1.0.0" and r["outputs"]["label"] in agent.model.classes
    direct = agent.predict(x[3])
    assert r["outputs"]["class_index"] == direct.class_index
    assert client.get("/v1/precomputed/nobody").status_code == 404
    with pytest.raises(BatchError, match="needs a 'key' column"):
        (tmp_path / "nokey.csv").write_text("a,b\n1,2\n")
        run_batch(agent, tmp_path / "nokey.csv", store)


def test_image_over_http(vision_built, tmp_path):
    model = load_model(extract(vision_built.package, tmp_path / "slot", vision_built.keys / "root.pub"), TARGET)
    a = Agent(DeviceConfig(device_id="cam-1", target=TARGET.name), TARGET, model, background=False)
    client = TestClient(create_app(a))
    png = next(iter(sorted(vision_built.holdout.glob("7/*.png"))))
    r = client.post("/v1/predict", json={"image_b64": base64.b64encode(png.read_bytes()).decode()})
    assert r.status_code == 200 and r.json()["label"] == "7"
    r = client.post("/v1/predict", json={"image_b64": base64.b64encode(b"not an image").decode()})
    assert r.status_code == 422 and r.json()["error"] == "bad_image"
    a.close()
