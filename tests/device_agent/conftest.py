"""Device-agent fixtures: a real Mosquitto per test, a summary factory, a device key, an agent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.model import load_model
from device_agent.predlog import PredictionLog
from edgefleet_contracts.signing import Ed25519PrivateKey, generate_key
from edgefleet_contracts.summary import LATENCY_EDGES_MS, FeatureWindow, Summary
from edgefleet_contracts.targets import get_target
from edgefleet_contracts.timeutil import fmt
from tests.brokers import Mosquitto
from tests.conftest import extract

SummaryFactory = Callable[..., Summary]

_T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto on a free loopback port, anonymous, no persistence; stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def summary(seq: int, *, device_id: str = "dev-1", model: str = "clinical", version: str = "1.0.0",
            count: int = 10, n_features: int = 2, n_bins: int = 4, n_classes: int = 2,
            n_confidence_bins: int = 5, window_seconds: int = 60) -> Summary:
    """A consistent, valid summary whose window is [seq * w, (seq + 1) * w) after 2026-01-01 UTC.

    Every count is derived from ``count`` so merged results can be checked by sums.
    """
    start = _T0 + timedelta(seconds=seq * window_seconds)
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[10] = count
    classes = [0] * n_classes
    classes[seq % n_classes] = count
    confidence = [0] * n_confidence_bins
    confidence[-1] = count
    feats = []
    for i in range(n_features):
        bins = [0] * n_bins
        bins[(seq + i) % n_bins] = count
        feats.append(FeatureWindow(f"f{i}", bins, missing=1, nan=0, out_of_range=0, n=count,
                                   sum=float(count * (i + 1)), sumsq=float(count * (i + 1) ** 2)))
    return Summary(device_id=device_id, model=model, version=version, seq=seq, start=fmt(start),
                   end=fmt(start + timedelta(seconds=window_seconds)), count=count, features=feats,
                   class_counts=classes, confidence_counts=confidence,
                   calibrated_sum=[0.9 * c for c in classes], latency_counts=latency,
                   errors={"invalid_input": 1})


@pytest.fixture
def make_summary() -> SummaryFactory:
    """``make_summary(seq, model=..., version=..., count=...)`` -> a valid Summary (see ``summary``)."""
    return summary


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture()
def clinical(built: Any, tmp_path: Path) -> Any:
    """The session's clinical package, installed in a slot and loaded (LoadedModel)."""
    return load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), get_target("x86_64-avx2"))


@pytest.fixture()
def rows(built: Any) -> np.ndarray:
    """The clinical holdout's rows, four times over (more than 2 x the window's staging BATCH)."""
    with np.load(built.holdout) as z:
        x = z["x"].astype(np.float32)
    return np.concatenate([x] * 4)


@pytest.fixture()
def vision(vision_built: Any, tmp_path: Path) -> Any:
    """The session's vision package, installed in a slot and loaded (LoadedModel)."""
    return load_model(extract(vision_built.package, tmp_path / "vslot", vision_built.keys / "root.pub"),
                      get_target("x86_64-avx2"))


@pytest.fixture()
def agent(built: Any, tmp_path: Path) -> Iterator[Agent]:
    """An agent serving the session's clinical package (k = 1: every window is summarised; no ticker thread)."""
    target = get_target("x86_64-avx2")
    model = load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), target)
    cfg = DeviceConfig(device_id="dev-1", target=target.name, min_window_samples=1, allow_small_windows=True)
    a = Agent(cfg, target, model, prediction_log=PredictionLog(tmp_path / "log"), background=False)
    yield a
    a.close()
