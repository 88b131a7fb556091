"""Drift on noised summaries (``dp_epsilon`` on the devices): no false alarms from the noise, shifts still seen.

Rows go through the agent's own window code, each window is released through the agent's own noise
(``device_agent.summarizer.add_laplace_noise``), and the releases are summed the way the server sums them
(``fleet_server.health.Layout``) and judged with the default policy. Before noise was unbiased and weighed,
every one of these reference-like scopes raised output drift (phantom counts in the empty confidence bins).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.model import LoadedModel
from device_agent.summarizer import add_laplace_noise
from device_agent.window import Window
from edgefleet_contracts.profile import Profile
from edgefleet_contracts.signing import envelope_json, sign_envelope
from edgefleet_contracts.summary import Summary, noise_variance
from fleet_server.health import HealthPolicy, Layout, Reference, assess
from tests.fleet_server.conftest import make_summary
from tests.fleet_server.test_drift_stats import SHIFT_SD, _population, _reference, all_rows, clinical  # noqa: F401


def judge(model: LoadedModel, profile: Profile, rows: np.ndarray, window: int, epsilon: float,
          seed: int) -> dict:
    """Rows -> one noised release per ``window`` rows -> summed as the server sums them -> the verdicts."""
    layout = Layout(profile)
    vec = np.zeros(layout.size)
    rng = np.random.default_rng(seed)
    for i in range(0, len(rows), window):
        chunk = rows[i:i + window]
        w = Window(profile, model.calibration, model.validator.lows, model.validator.highs)
        w.observe_many(chunk, model.runtime.run(chunk), np.full(len(chunk), 200_000.0))
        s = w.to_summary(f"dev-{i % 10}", model.name, model.version, 1, "2026-01-01T00:00:00Z",
                         "2026-01-01T01:00:00Z")
        released = Summary.from_dict(add_laplace_noise(s, epsilon, rng).to_dict())  # through the wire contract
        vec += layout.row(released.to_dict())
    ref = Reference(model.name, model.version, profile, model.calibration, 0.97, "test")
    return assess(ref, layout, vec, HealthPolicy())


@pytest.fixture(scope="module")
def profile(clinical, all_rows) -> Profile:  # noqa: F811
    return _reference(clinical, _population(all_rows, np.random.default_rng(11), 1000))


@pytest.mark.parametrize(("window", "epsilon"), [(50, 1.0), (20, 0.25)])
def test_noised_windows_from_the_reference_population_raise_no_drift(clinical, all_rows, profile,  # noqa: F811
                                                                      window, epsilon):
    rng = np.random.default_rng(3)
    for seed in range(4):
        h = judge(clinical, profile, _population(all_rows, rng, 3000), window, epsilon, seed)
        assert h["input_drift"]["drifted_features"] == [], h["input_drift"]["features"][0]  # unweighted: 8 of 8
        assert not h["output_drift"]["drifted"], h["output_drift"]  # clipped: 8 of 8
        assert h["input_drift"]["noise_variance"] == pytest.approx(3000 / window * noise_variance(epsilon))
        worst = h["input_drift"]["features"][0]
        assert worst["n_effective"] < worst["n"]


def test_a_0_3_sd_shift_is_still_caught_under_noise_with_three_times_the_values(clinical, all_rows,  # noqa: F811
                                                                                  profile):
    """Without noise 2,000 values catch it (test_drift_stats); at epsilon 1 in 50-value windows, 6,000 do."""
    rng = np.random.default_rng(7)
    for feature in (0, 7, 22):
        rows = _population(all_rows, rng, 6000)
        rows[:, feature] += SHIFT_SD * profile.features[feature].std
        h = judge(clinical, profile, rows, 50, 1.0, feature)
        assert h["input_drift"]["drifted_features"] == [profile.features[feature].name]
        assert not h["output_drift"]["drifted"]


def test_strong_noise_leaves_too_few_effective_values_and_says_insufficient_with_the_true_count(
        clinical, all_rows, profile):  # noqa: F811
    # epsilon 0.05 (allowed on a device) over 200 windows of 20: ~4,000 values, but each window's histogram
    # carries noise of variance ~800 a bin, so the test has the power of a handful of values.
    rows = _population(all_rows, np.random.default_rng(5), 4000)
    h = judge(clinical, profile, rows, 20, 0.05, 0)
    feats = h["input_drift"]["features"]
    assert {f["verdict"] for f in feats} == {"insufficient"}, feats[0]  # was "ok" on the clipped totals
    assert all(f["n_effective"] < 100 for f in feats)
    assert {f["n"] for f in feats} == {4000}  # the values counted (exact); the clipped totals read ~5,000


def test_released_counts_are_unbiased_and_may_be_negative():
    """The mean of many releases of an empty bin is 0 (clipping made it ≈ 1/(2ε) per release)."""
    s = Summary("dev-1", "m", "1", 1, "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z", 0, [], [0, 0], [0] * 10,
                [0.0, 0.0], [0] * 50, {})
    rng = np.random.default_rng(0)
    releases = np.array([add_laplace_noise(s, 1.0, rng).confidence_counts for _ in range(2000)])
    assert abs(releases.mean()) < 0.05 and (releases < 0).any()
    assert releases.var() == pytest.approx(noise_variance(1.0), rel=0.1)


def test_a_noised_release_with_negative_counts_is_ingested_and_a_plain_one_is_quarantined(http) -> None:
    """Through the real ingest path (HTTP, signature, the full path for the signed counts): the noised body is
    stored as sent, negative counts and noise variance included; the same counts without epsilon are a schema
    reject naming the rule."""
    client, fleet, _ = http
    dev = fleet["dev-1"]
    noised = add_laplace_noise(make_summary(1, "dev-1"), 1.0, np.random.default_rng(0))
    noised.confidence_counts[0] = -2
    body = b"[" + envelope_json(sign_envelope(noised.to_dict(), dev.key)) + b"]"
    r = client.post("/api/v1/summaries", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    stored = json.loads(fleet.store.query("SELECT body FROM summaries WHERE device_id = 'dev-1' AND seq = 1")[0]
                        ["body"])
    assert stored["output"]["confidence_counts"][0] == -2
    assert stored["privacy"]["noise_variance"] == pytest.approx(noise_variance(1.0))

    plain = make_summary(2, "dev-1")
    plain.confidence_counts[0] = -2
    body = b"[" + envelope_json(sign_envelope(plain.to_dict(), dev.key)) + b"]"
    r = client.post("/api/v1/summaries", content=body, headers={"Content-Type": "application/json"})
    assert r.json()["accepted"] == 0 and fleet.quarantined()[-1]["reason"] == "schema"
    assert "negative counts only in a noised summary" in fleet.quarantined()[-1]["detail"]
