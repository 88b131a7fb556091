"""The agent's inference and summaries, on real packages extracted as slots, with the real runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.errors import AlreadyLabelledError, InputError, MalformedPredictionIdError, UnknownClassError
from device_agent.model import load_model
from device_agent.predlog import PredictionLog
from device_agent.runtime import open_runtime
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.targets import get_target
from tests.conftest import extract

TARGET = get_target("x86_64-avx2")


@pytest.fixture()
def clinical(built, tmp_path):
    return load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), TARGET)


@pytest.fixture()
def holdout(built):
    with np.load(built.holdout) as z:
        return z["x"], z["y"]


def _agent(model, tmp_path, **cfg) -> Agent:
    c = DeviceConfig(device_id="dev-1", target=TARGET.name,
                     **{"min_window_samples": 5, "allow_small_windows": True, **cfg})
    return Agent(c, TARGET, model, prediction_log=PredictionLog(tmp_path / "log"), background=False)


def test_predict_returns_the_models_output_with_version_id_and_latency(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path)
    x, _ = holdout
    p = agent.predict(x[0])
    bare = open_runtime("onnxruntime", clinical.slot / "model.onnx", "probabilities").run(x[:1])[0]
    np.testing.assert_allclose(p.probabilities, bare, rtol=1e-6)
    assert (p.model, p.version) == ("clinical", "1.0.0") and p.latency_ms > 0
    assert p.label == clinical.classes[int(bare.argmax())]
    assert agent.predict(x[1]).prediction_id != p.prediction_id
    agent.close()


def test_bad_inputs_name_the_feature_are_counted_and_the_agent_keeps_serving(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path)
    x, _ = holdout
    names = clinical.validator.names
    bad = x[0].copy()
    bad[3] = np.nan
    with pytest.raises(InputError, match=f"feature '{names[3]}' is NaN"):
        agent.predict(bad)
    bad[3] = 1e9
    with pytest.raises(InputError, match=f"feature '{names[3]}' = 1e\\+09 is outside its valid range"):
        agent.predict(bad)
    with pytest.raises(InputError, match="takes numeric features, not an image"):
        agent.predict(b"\x89PNG")
    with pytest.raises(InputError, match="shape \\[29\\], expected \\[30\\]"):
        agent.predict(x[0][:29])
    fields = dict(zip(names, map(float, x[0]), strict=True))
    renamed = dict(fields)
    renamed["radius_mean"] = renamed.pop(names[0])
    with pytest.raises(InputError, match="schema changed upstream: missing .* and unexpected .*renamed"):
        agent.predict(renamed)
    with pytest.raises(InputError, match="unexpected field"):
        agent.predict({**fields, "extra": 1.0})
    with pytest.raises(InputError, match=r"missing feature\(s\) '.*' and 24 more \(29 in all\)"):
        agent.predict({names[0]: 1.0})  # a partial list of what is missing says it is partial
    with pytest.raises(InputError, match="must be a number, got str"):
        agent.predict({**fields, names[2]: "12"})
    # what a float conversion would take silently: a complex array (imaginary part dropped), strings that spell
    # numbers (the HTTP API refuses "14.2" too), booleans
    with pytest.raises(InputError, match="input is not numeric: expected 30 numbers; it holds complex numbers"):
        agent.predict(x[0].astype(np.complex128) + 5j)
    with pytest.raises(InputError, match="it holds strings"):
        agent.predict([str(v) for v in x[0]])
    with pytest.raises(InputError, match="batch is not a numeric \\[N, F\\] array; it holds booleans"):
        agent.predict_batch(np.ones((2, 30), dtype=bool))
    assert agent.predict(fields).version == "1.0.0"  # still serving
    assert agent.counters.rejected == {"nan": 1, "out_of_range": 1, "wrong_shape": 5, "missing_field": 2,
                                       "unexpected_field": 1, "invalid_input": 1}
    for i in range(10):
        agent.predict(x[i])
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    f3 = next(f for f in s.features if f.name == names[3])
    assert (f3.nan, f3.out_of_range) == (1, 1)
    assert s.errors["nan"] == 1 and s.errors["missing_field"] == 2
    agent.close()


def test_window_summary_counts_match_the_rows_and_hold_no_raw_value(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path, window_count=50)
    x, _ = holdout
    for row in x[:50]:  # the 50th prediction closes the window by count
        agent.predict(row)
    agent.close()
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert s.count == 50 and s.seq == 1 and (s.model, s.version, s.device_id) == ("clinical", "1.0.0", "dev-1")
    assert all(sum(f.counts) == f.n == 50 for f in s.features)
    assert sum(s.class_counts) == 50 and sum(s.confidence_counts) == 50 and sum(s.latency_counts) == 50
    np.testing.assert_allclose([f.sum for f in s.features], x[:50].astype(np.float64).sum(axis=0), rtol=1e-5)
    text = json.dumps(s.to_dict())
    edges = {repr(float(e)) for f in clinical.profile.features for e in f.edges}
    raw = {repr(float(v)) for v in x[:50].ravel() if len(repr(float(v))) > 6} - edges
    assert raw and not [r for r in raw if r in text]
    assert Summary.from_dict(json.loads(text)).count == 50  # round-trips through the contract


def test_windows_below_k_are_held_and_merged_forward_never_sent_alone(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path, min_window_samples=20)
    x, _ = holdout
    for chunk in (7, 8, 9):
        for row in x[:chunk]:
            agent.predict(row)
        agent.close_window(wait=True)
    sums = agent.sink.summaries  # type: ignore[attr-defined]
    assert len(sums) == 1 and sums[0].count == 24 and sums[0].windows == 3 and sums[0].seq == 1
    assert agent.summarizer.held == 2
    agent.close()


def test_laplace_noise_is_applied_and_the_budget_reported(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path, dp_epsilon=0.5)
    x, _ = holdout
    for row in x[:40]:
        agent.predict(row)
    agent.close_window(wait=True)
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert s.epsilon == 0.5 and s.epsilon_spent == 0.5
    assert any(sum(f.counts) != 40 for f in s.features)  # noisy counts
    assert agent.sink.meta["epsilon_spent"] == "0.5"  # type: ignore[attr-defined]
    assert agent.status()["dp_epsilon_spent"] == 0.5
    agent.close()


def test_feedback_fills_the_confusion_matrix(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path)
    x, y = holdout
    preds = [agent.predict(row) for row in x[:30]]
    for p, label in zip(preds, y[:30], strict=True):
        agent.feedback(p.prediction_id, int(label))
    with pytest.raises(AlreadyLabelledError, match="already has a label"):  # counted once, not twice
        agent.feedback(preds[0].prediction_id, clinical.classes[0])
    with pytest.raises(MalformedPredictionIdError, match="malformed prediction id"):
        agent.feedback("nope", 1)
    with pytest.raises(MalformedPredictionIdError, match="malformed prediction id"):
        agent.feedback("*-5", 1)  # not a glob
    with pytest.raises(UnknownClassError, match="unknown class 'maybe'"):
        agent.feedback(preds[0].prediction_id, "maybe")
    agent.close_window(wait=True)
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert s.confusion is not None and sum(map(sum, s.confusion)) == 30
    correct = sum(int(p.class_index == t) for p, t in zip(preds, y[:30], strict=True))
    assert s.confusion[0][0] + s.confusion[1][1] == correct
    assert agent.status()["feedback_unmatched"] == 2 and agent.status()["prediction_log"]["dropped"] == 0
    agent.close()


def test_batch_predictions_match_single_ones_and_bad_rows_do_not_stop_the_rest(clinical, holdout, tmp_path):
    agent = _agent(clinical, tmp_path)
    x, _ = holdout
    batch = x[:20].copy()
    batch[5, 0] = np.nan
    out = agent.predict_batch(batch)
    assert isinstance(out[5], InputError) and out[5].kind == "nan"
    single = agent.predict(x[6])
    np.testing.assert_allclose(out[6].probabilities, single.probabilities, rtol=1e-5)  # type: ignore[union-attr]
    assert sum(not isinstance(o, InputError) for o in out) == 19
    agent.close()


def test_image_package_decodes_with_opencv_and_summarises_image_statistics(vision_built, tmp_path):
    model = load_model(extract(vision_built.package, tmp_path / "slot", vision_built.keys / "root.pub"), TARGET)
    agent = _agent(model, tmp_path)
    pngs = sorted(vision_built.holdout.glob("*/*.png"))[:40]
    right = 0
    for png in pngs:
        p = agent.predict(png.read_bytes())
        right += p.label == png.parent.name
    assert right >= 36
    with pytest.raises(InputError, match="cannot be decoded"):
        agent.predict(b"\x89PNG broken")
    agent.close_window(wait=True)
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert [f.name for f in s.features] == ["brightness_gray", "contrast_gray", "sharpness"]
    assert s.count == 40 and s.errors == {"bad_image": 1}
    assert all(f.n == 10 for f in s.features)  # statistics on 1 image in 4 (image_stats_every)
    assert 0 < s.features[0].sum / 10 < 255  # mean brightness on the 0..255 scale
    agent.close()
