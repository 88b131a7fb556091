"""The agent's ticker thread outlives unexpected errors: windows still close by time and slots are still picked
up after a tick raised (before, one OSError from a full disk ended the thread silently)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.model import load_model
from device_agent.predlog import PredictionLog
from edgefleet_contracts.targets import get_target
from tests.conftest import extract
from tests.support import wait_until

TARGET = get_target("x86_64-avx2")


@pytest.fixture()
def agent(built, tmp_path):
    model = load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), TARGET)
    cfg = DeviceConfig(device_id="dev-1", target=TARGET.name, min_window_samples=1, allow_small_windows=True,
                       window_count=10**6, window_seconds=1)
    a = Agent(cfg, TARGET, model, prediction_log=PredictionLog(tmp_path / "log"), background=True)
    yield a
    a.close()


def test_a_tick_that_raises_is_counted_and_the_ticker_goes_on(agent, built, monkeypatch):
    with np.load(built.holdout) as z:
        rows = z["x"].astype(np.float32)[:5]
    calls = {"n": 0}

    def disk_full() -> None:
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(agent, "reload", disk_full)
    assert wait_until(lambda: agent.status()["tick_failures"] >= 2, 10), agent.status()
    monkeypatch.undo()  # the disk has room again
    for r in rows:
        agent.predict(r)
    closed = agent.status()["windows_closed"]
    assert wait_until(lambda: agent.status()["windows_closed"] > closed, 10), "windows stopped closing by time"
    assert calls["n"] >= 2

