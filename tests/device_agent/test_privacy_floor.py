"""The privacy floor on k (``min_window_samples``): a device refuses k < 10 unless ``allow_small_windows`` waives
the floor, which is written to config.toml and warned about at every open. Noise covers the histogram counts only,
so the exact sums of a window of very few predictions give their inputs away; the floor is enforced, not advised.

Real provisioned device folders, real config.toml files (including ones written before the floor existed) and
the real ``Agent.open``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.config import ConfigError, DeviceConfig, DeviceDir
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


@pytest.fixture()
def dev(built, tmp_path: Path) -> DeviceDir:
    """A provisioned device with no model yet (it opens and serves nothing): all these tests need."""
    return new_device(built, tmp_path / "dev")


def test_a_config_below_the_floor_is_refused_naming_the_key_and_the_floor() -> None:
    for k in (1, 5, 9):
        with pytest.raises(ConfigError, match=rf"min_window_samples is {k}, below the privacy floor of 10"):
            DeviceConfig(device_id="dev-1", target=TARGET, min_window_samples=k)
    assert DeviceConfig(device_id="dev-1", target=TARGET, min_window_samples=10).min_window_samples == 10


def test_opening_a_device_with_k_below_the_floor_is_refused(dev: DeviceDir) -> None:
    _set(dev, min_window_samples="5")
    with pytest.raises(ConfigError) as err:
        Agent.open(dev.path, background=False)
    msg = str(err.value)
    assert str(dev.config_file) in msg
    assert "min_window_samples is 5, below the privacy floor of 10" in msg
    assert "min_window_samples = 10 or more" in msg and "allow_small_windows = true" in msg


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
    _set(dev, min_window_samples="9")
    with pytest.raises(ConfigError, match="privacy floor of 10"):
        Agent.open(dev.path, background=False)
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


def test_an_old_config_file_with_a_small_k_is_refused_saying_what_to_change(dev: DeviceDir) -> None:
    _as_written_before_the_floor(dev, 3)
    with pytest.raises(ConfigError) as err:
        dev.load_config()
    msg = str(err.value)
    assert msg.startswith(f"{dev.config_file}: min_window_samples is 3, below the privacy floor of 10")
    assert "Set min_window_samples = 10 or more" in msg
    assert "allow_small_windows = true to waive the floor" in msg


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
