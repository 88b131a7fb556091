"""The privacy floor on k (``min_window_samples``): a config with k < 10 is refused unless ``allow_small_windows``
waives the floor, which is written to config.toml and warned about at every open. Noise covers the histogram counts
only, so the exact sums of a window of very few predictions give their inputs away; the floor is enforced, not
advised. A config.toml that is *loaded* with k < 10 and no waiver (written before the floor existed) is the one
lenient case: the device keeps serving with k = 10 and warns what to change; the file is left as it is.

Real provisioned device folders, real config.toml files (including ones written before the floor existed) and
the real ``Agent.open``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import ConfigError, DeviceConfig, DeviceDir
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.targets import get_target

from . import new_device

TARGET = get_target("x86_64-avx2").name


def _set(dev: DeviceDir, **keys: str) -> None:
    """Rewrite ``key = value`` lines of config.toml as an operator would (values are TOML literals)."""
    text = dev.config_file.read_text()
    for key, value in keys.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, f"{key} not in config.toml"
    dev.config_file.write_text(text)


def _as_written_before_the_floor(dev: DeviceDir, k: int) -> None:
    """A config.toml as older agents wrote it: no allow_small_windows key at all."""
    _set(dev, min_window_samples=str(k))
    text = dev.config_file.read_text()
    dev.config_file.write_text(re.sub(r"(?m)^allow_small_windows = .*\n", "", text))
    assert "allow_small_windows" not in dev.config_file.read_text()


def _floor_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "min_window_samples" in r.getMessage()]


def _assert_runs_at_the_floor_warning(warnings: list[str], dev: DeviceDir, configured: int) -> None:
    """Each part of the load-time warning: the file, the value in it, the value used, what to change."""
    assert warnings, "no warning for a config.toml below the floor"
    for w in warnings:  # config.toml is read by the agent, the updater, ...: each load warns the same
        assert w.startswith(f"{dev.config_file}: min_window_samples is {configured}, below the privacy floor of 10")
        assert "using min_window_samples = 10 instead" in w
        assert f"Set min_window_samples = 10 or more in {dev.config_file}" in w
        assert "the file is left as it is" in w


def _summaries_sent(agent: Agent) -> list[tuple[int, int]]:
    """(predictions, windows) of every summary queued in the device's outbox: what would leave the device."""
    rows = agent.sink.peek(100)  # type: ignore[attr-defined]
    return [(s.count, s.windows) for s in (Summary.from_dict(r.document()) for r in rows if r.kind == "summary")]


@pytest.fixture()
def dev(built, tmp_path: Path) -> DeviceDir:
    """A provisioned device with no model yet (it opens and serves nothing): all these tests need."""
    return new_device(built, tmp_path / "dev")


def test_a_config_below_the_floor_is_refused_naming_the_key_and_the_floor() -> None:
    for k in (1, 5, 9):
        with pytest.raises(ConfigError, match=rf"min_window_samples is {k}, below the privacy floor of 10"):
            DeviceConfig(device_id="dev-1", target=TARGET, min_window_samples=k)
    assert DeviceConfig(device_id="dev-1", target=TARGET, min_window_samples=10).min_window_samples == 10


def test_opening_a_device_with_k_below_the_floor_runs_at_the_floor_and_warns_what_to_change(
        dev: DeviceDir, caplog: pytest.LogCaptureFixture) -> None:
    _set(dev, min_window_samples="5")
    written = dev.config_file.read_text()
    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        agent = Agent.open(dev.path, background=False)
    try:
        assert (agent.cfg.min_window_samples, agent.cfg.allow_small_windows) == (10, False)
        assert agent.summarizer.k == 10 and agent.status()["k"] == 10  # status shows the k in force
    finally:
        agent.close()
    _assert_runs_at_the_floor_warning(_floor_warnings(caplog), dev, 5)
    assert dev.config_file.read_text() == written  # the operator's file is not rewritten


def test_the_override_opens_a_small_k_device_and_warns_at_every_open(
        dev: DeviceDir, caplog: pytest.LogCaptureFixture) -> None:
    _set(dev, min_window_samples="5", allow_small_windows="true")
    for _ in range(2):
        caplog.clear()
        with caplog.at_level("WARNING", logger="edgefleet.agent"):
            agent = Agent.open(dev.path, background=False)
        try:
            assert agent.cfg.allow_small_windows and agent.summarizer.k == 5
        finally:
            agent.close()
        (warning,) = _floor_warnings(caplog)
        assert "min_window_samples is 5, below the privacy floor of 10" in warning
        assert "allow_small_windows = true" in warning and str(dev.config_file) in warning


def test_k_from_the_floor_up_opens_without_a_warning(dev: DeviceDir, caplog: pytest.LogCaptureFixture) -> None:
    _set(dev, min_window_samples="9")  # one below: runs at the floor, warned
    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        agent = Agent.open(dev.path, background=False)
    agent.close()
    assert agent.summarizer.k == 10
    _assert_runs_at_the_floor_warning(_floor_warnings(caplog), dev, 9)
    for k in (10, 19):  # above the floor nothing is waived: no warning (README: "k from 10 to 19")
        _set(dev, min_window_samples=str(k))
        caplog.clear()
        with caplog.at_level("WARNING", logger="edgefleet.agent"):
            agent = Agent.open(dev.path, background=False)
        agent.close()
        assert agent.summarizer.k == k
        assert _floor_warnings(caplog) == [], caplog.text


def test_an_old_config_file_without_the_key_loads_with_the_floor_in_force(
        dev: DeviceDir, caplog: pytest.LogCaptureFixture) -> None:
    _as_written_before_the_floor(dev, 20)
    cfg = dev.load_config()
    assert (cfg.min_window_samples, cfg.allow_small_windows) == (20, False)
    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        Agent.open(dev.path, background=False).close()
    assert _floor_warnings(caplog) == [], caplog.text
    dev.save_config(cfg)  # saved again, the file now shows the floor is not waived
    assert "allow_small_windows = false" in dev.config_file.read_text().splitlines()


def test_an_old_config_file_with_a_small_k_keeps_serving_and_holds_windows_below_the_floor(
        built, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    serving = new_device(built, tmp_path / "serving", package=built.package)
    _as_written_before_the_floor(serving, 3)
    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        agent = Agent.open(serving.path, background=False)
    _assert_runs_at_the_floor_warning(_floor_warnings(caplog), serving, 3)
    with np.load(built.holdout) as z:
        x = z["x"]
    try:
        for row in x[:5]:  # 5 >= the 3 in the file, < the 10 in force
            agent.predict(row)
        agent.close_window(wait=True)
        assert _summaries_sent(agent) == [] and agent.status()["windows_held_for_k"] == 1
        for row in x[5:10]:  # 5 more: the held window and this one reach k = 10 together
            agent.predict(row)
        agent.close_window(wait=True)
        assert _summaries_sent(agent) == [(10, 2)]
        assert agent.status()["k"] == 10
    finally:
        agent.close()


def test_only_loading_is_lenient_a_config_below_the_floor_is_never_written(dev: DeviceDir) -> None:
    _as_written_before_the_floor(dev, 3)
    cfg = dev.load_config()
    assert (cfg.min_window_samples, cfg.allow_small_windows) == (10, False)
    with pytest.raises(ConfigError, match="min_window_samples is 3, below the privacy floor of 10"):
        replace(cfg, min_window_samples=3)  # the only way to a DeviceConfig that save_config could write
    dev.save_config(cfg)  # an explicit save writes the k in force, and the floor as not waived
    lines = dev.config_file.read_text().splitlines()
    assert "min_window_samples = 10" in lines and "allow_small_windows = false" in lines
    _set(dev, min_window_samples="0")  # below 1 is no old agent's value: still refused
    with pytest.raises(ConfigError, match="min_window_samples must be at least 1"):
        dev.load_config()


def test_the_override_round_trips_through_the_saved_config(dev: DeviceDir) -> None:
    waived = replace(dev.load_config(), min_window_samples=1, allow_small_windows=True)
    dev.save_config(waived)
    lines = dev.config_file.read_text().splitlines()
    assert "allow_small_windows = true" in lines and "min_window_samples = 1" in lines
    assert dev.load_config() == waived
    restored = replace(waived, min_window_samples=20, allow_small_windows=False)
    dev.save_config(restored)
    assert dev.load_config() == restored
    assert "allow_small_windows = false" in dev.config_file.read_text().splitlines()


def test_the_override_must_be_a_boolean_and_does_not_allow_k_below_one(dev: DeviceDir) -> None:
    _set(dev, min_window_samples="5", allow_small_windows='"yes"')
    with pytest.raises(ConfigError, match="allow_small_windows must be true or false"):
        dev.load_config()
    with pytest.raises(ConfigError, match="min_window_samples must be at least 1"):
        DeviceConfig(device_id="dev-1", target=TARGET, min_window_samples=0, allow_small_windows=True)
