"""What the server now checks of a summary's numbers (``edgefleet_contracts.summary.consistency_problem``) holds
for every summary a real agent writes: mixed good and refused inputs, rows still staged when the window closes,
images whose statistics are sampled, merged windows and noised releases. A rule the agent can break would make
the server refuse a healthy device's summaries, so each kind of agent output is checked here with the real
models and the real ``Summary.from_dict`` (the full path) and ``fastpath.decode`` (the server's fast path)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import InputError
from device_agent.summarizer import add_laplace_noise
from edgefleet_contracts.signing import envelope_json, generate_key, sign_envelope
from edgefleet_contracts.summary import Summary, merge
from fleet_server.ingest import fastpath
from tests.device_agent.test_hot_path import BATCH, _agent


def _accepted_by_both_paths(s: Summary) -> None:
    """Accepted by the full path, and by the fast path unless a noised count is negative (those always take the
    full path, ``fastpath._Count``)."""
    doc = s.to_dict()
    assert Summary.from_dict(doc) == s  # raises SchemaError naming the problem otherwise
    wire = b"[" + envelope_json(sign_envelope(doc, generate_key())) + b"]"
    negative = min(min(x.counts) for x in s.features) < 0 or min(s.class_counts + s.confidence_counts) < 0
    assert (fastpath.decode(wire) is not None) or negative, "the fast path refused an agent's summary"


def test_an_agents_tabular_windows_pass_including_refused_and_staged_rows(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    rng = np.random.default_rng(7)
    bad = rows[:40].copy()
    bad[::3, 0] = np.nan
    bad[1::3, 1] = 1e9  # far out of the feature's range
    refused = 0
    for r in np.concatenate([rows[: BATCH + 13], bad, rows[BATCH:BATCH + 9]]):
        try:
            agent.predict(r)
        except InputError:
            refused += 1
    for i in rng.integers(0, len(rows), 5):
        agent.feedback(agent.predict(rows[i]).prediction_id, 1)
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert refused and sum(s.errors.values()) >= refused and s.confusion is not None
    _accepted_by_both_paths(s)
    agent.close()


def test_merged_and_noised_agent_windows_pass(clinical, rows, tmp_path):
    agent = _agent(clinical, tmp_path)
    out = []
    for part in (rows[:50], rows[50:53], rows[53:400]):
        agent.predict_batch(part)
        agent.close_window(wait=True)
        out.append(agent.sink.summaries[-1])  # type: ignore[attr-defined]
    merged = merge(merge(out[0], out[1]), out[2])
    assert merged.count == 400
    _accepted_by_both_paths(merged)
    rng = np.random.default_rng(3)
    for eps in (0.05, 1.0, 10.0):
        noised = add_laplace_noise(out[2], eps, rng)
        _accepted_by_both_paths(noised)
        _accepted_by_both_paths(merge(noised, add_laplace_noise(out[0], eps, rng)))
    agent.close()


def test_an_image_agents_windows_pass_with_sampled_statistics(vision, vision_built, tmp_path):
    agent = _agent(vision, tmp_path, image_stats_every=3)
    for png in sorted(vision_built.holdout.glob("*/*.png"))[:25]:
        agent.predict(png.read_bytes())
    with pytest.raises(InputError):
        agent.predict(b"not an image")
    agent.close_window(wait=True)
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    assert s.count == 25 and 0 < s.features[0].n < 25  # statistics of every third image only
    _accepted_by_both_paths(s)
    agent.close()


@pytest.mark.parametrize("seed", range(3))
def test_random_batches_through_a_real_window_pass(clinical, rows, tmp_path, seed):
    """observe_many (the batched path, with NaN and out-of-range values binned as the slow path bins them)."""
    agent = _agent(clinical, tmp_path)
    rng = np.random.default_rng(seed)
    x = rows[rng.integers(0, len(rows), 300)].astype(np.float64)
    x[rng.random(x.shape) < 0.02] = np.nan
    x[rng.random(x.shape) < 0.02] *= 1e6
    w = agent._window
    assert w is not None
    w.observe_many(x, np.tile([0.3, 0.7], (len(x), 1)), rng.uniform(5e4, 5e6, len(x)))
    _accepted_by_both_paths(w.to_summary("dev-1", "clinical", "1.0.0", 1, "2026-01-01T00:00:00Z",
                                         "2026-01-01T00:01:00Z"))
    agent.close()
