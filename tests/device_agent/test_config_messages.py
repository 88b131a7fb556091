"""What config.toml tells an operator: every key of the wrong type is refused naming the file, the key, the type
expected and the value (`window_count = "1000"` used to fail as `'<' not supported between instances of 'str' and
'int'`); values out of range name their key and value, the rollout keys included; and the privacy-floor warning is
logged once per process, not once per part of the process that loads the file (5 times per `device-agent run`
start, twice per `predict`, before).

Real config.toml files read by the real loader; real device folders, the real runner and the real command line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.cli import main as agent_cli
from device_agent.config import ConfigError, DeviceConfig, DeviceDir
from device_agent.runner import DeviceRunner

from . import TARGET, new_device

ROOT = Path(__file__).resolve().parents[2]

# A value of the wrong type for each kind of key, and how the refusal must name the type and the value.
WRONG = {
    "str": ("5", "must be a string in quotes", "not the number 5"),
    "int": ('"1000"', "must be a whole number", 'not the string "1000"'),
    "float": ('"300"', "must be a number", 'not the string "300"'),
    "bool": ('"yes"', "must be true or false", 'not the string "yes"'),
}


def _set_line(text: str, key: str, value: str) -> str:
    line = f"{key} = {value}"
    text, n = re.subn(rf"(?m)^{key} = .*$", lambda _m: line, text)
    assert n == 1, key
    return text


def _write(folder: Path, **keys: str) -> DeviceDir:
    """A config.toml as the device writes it, with ``keys`` set to the given TOML literals (as a hand edit)."""
    folder.mkdir(parents=True, exist_ok=True)
    dev = DeviceDir(folder)
    text = DeviceConfig(device_id="dev-1", target=TARGET).to_toml()
    for key, value in keys.items():
        if key == "tags":
            text = text.replace("\n[tags]\n", "\n")
            text = f"tags = {value}\n" + text
            continue
        text = _set_line(text, key, value)
    dev.config_file.write_text(text)
    return dev


def _refusal(dev: DeviceDir) -> str:
    with pytest.raises(ConfigError) as info:
        dev.load_config()
    return str(info.value)


@pytest.mark.parametrize("name", [f.name for f in fields(DeviceConfig) if f.name != "tags"])
def test_every_key_of_the_wrong_type_is_refused_naming_file_key_type_and_value(tmp_path: Path, name: str) -> None:
    kind = next(str(f.type) for f in fields(DeviceConfig) if f.name == name)
    value, expected, shown = WRONG[kind]
    dev = _write(tmp_path, **{name: value})
    msg = _refusal(dev)
    assert msg.startswith(f"{dev.config_file}: {name} {expected} (")  # the file, the key, the type, an example
    assert msg.endswith(shown), msg  # the value as it is in the file
    assert "not supported between" not in msg


def test_the_audited_case_window_count_as_a_string(tmp_path: Path) -> None:
    dev = _write(tmp_path, window_count='"1000"')
    assert _refusal(dev) == (f'{dev.config_file}: window_count must be a whole number (window_count = 1000), not the '
                             'string "1000"')


@pytest.mark.parametrize(("value", "shown"), [('"site=north"', 'the string "site=north"'),
                                              ('{ site = 3 }', "a table {'site': 3}"),
                                              ('["north"]', "an array ['north']")])
def test_tags_must_be_a_table_of_strings(tmp_path: Path, value: str, shown: str) -> None:
    dev = _write(tmp_path, tags=value)
    msg = _refusal(dev)
    assert msg.startswith(f"{dev.config_file}: tags must be a table of strings ([tags] site = \"north\"), not ")
    assert shown in msg


@pytest.mark.parametrize(("key", "value", "words"), [
    ("window_seconds", "nan", "window_seconds must be a finite number (window_seconds = 300.0), not the number nan"),
    ("dp_epsilon", "inf", "dp_epsilon must be a finite number (dp_epsilon = 0.0), not the number inf"),
    ("min_window_samples", "12.0", "min_window_samples must be a whole number (min_window_samples = 20), not the "
                                   "number 12.0"),
    ("http_port", "true", "http_port must be a whole number (http_port = 8470), not the boolean true"),
    ("allow_small_windows", "1", "allow_small_windows must be true or false (allow_small_windows = false), not the "
                                 "number 1"),
])
def test_numbers_and_booleans_are_not_mixed_up(tmp_path: Path, key: str, value: str, words: str) -> None:
    dev = _write(tmp_path, **{key: value})
    assert _refusal(dev) == f"{dev.config_file}: {words}"


@pytest.mark.parametrize(("key", "value", "words"), [
    ("window_count", "0", "window_count must be at least 1, not 0"),
    ("http_port", "70000", "http_port must be 1..65535, not 70000"),
    ("probation_seconds", "0", "probation_seconds must be positive, not 0.0"),
    ("probation_predictions", "0", "probation_predictions must be at least 1, not 0"),
    ("probation_max_error_rate", "1.5", "probation_max_error_rate must be at least 0 and below 1 (0.05 is 5 %), "
                                        "not 1.5"),
    ("probation_latency_ratio", "0.5", "probation_latency_ratio must be at least 1.0, not 0.5"),
    ("probation_latency_floor_ms", "-1", "probation_latency_floor_ms must be 0 or more, not -1.0"),
    ("download_rate_limit", "-5", "download_rate_limit must be 0 or more, not -5.0"),
    ("download_read_timeout", "0", "download_read_timeout must be positive, not 0.0"),
    ("busy_defer_seconds", "-1", "busy_defer_seconds must be 0 or more, not -1.0"),
    ("maintenance_window", '"2-4"', "maintenance_window: window '2-4' must look like 02:00-04:00 (UTC); empty means "
                                    "any time"),
])
def test_values_out_of_range_name_the_key_and_the_value_the_rollout_keys_too(tmp_path: Path, key: str, value: str,
                                                                            words: str) -> None:
    dev = _write(tmp_path, **{key: value})
    assert _refusal(dev) == f"{dev.config_file}: {words}"


def test_a_whole_number_for_a_float_key_loads_as_a_float(tmp_path: Path) -> None:
    cfg = _write(tmp_path, window_seconds="300", dp_epsilon="1").load_config()
    assert (cfg.window_seconds, cfg.dp_epsilon) == (300.0, 1.0)
    assert type(cfg.window_seconds) is float and type(cfg.dp_epsilon) is float


def test_a_config_built_in_code_is_type_checked_too() -> None:
    with pytest.raises(ConfigError, match=r'^window_count must be a whole number \(window_count = 1000\), not the '
                                          r'string "1000"$'):
        DeviceConfig(device_id="dev-1", target=TARGET, window_count="1000")  # type: ignore[arg-type]


# ---- the privacy-floor warning: once per process -------------------------------------------------------------
def _floor_warnings(caplog: pytest.LogCaptureFixture, dev: DeviceDir) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"{dev.config_file}: min_window_samples is 5, below the privacy floor")]


def _below_the_floor(dev: DeviceDir) -> None:
    text = dev.config_file.read_text()
    dev.config_file.write_text(re.sub(r"(?m)^min_window_samples = .*$", "min_window_samples = 5", text))


def test_a_run_start_warns_once_about_a_config_below_the_floor(built: Any, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    dev = new_device(built, tmp_path / "dev", package=built.package)
    _below_the_floor(dev)
    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        runner = DeviceRunner(dev.path, http=False, report_settle_seconds=0.0)
        try:
            runner.start()  # the report, the desired-state worker, housekeeping: each loads config.toml
            time.sleep(1.5)
            runner.check_report()
            assert runner.agent.status()["k"] == 10
        finally:
            runner.stop()
    assert len(_floor_warnings(caplog, dev)) == 1, _floor_warnings(caplog, dev)


def test_a_predict_warns_once_and_each_new_process_warns_again(built: Any, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    dev = new_device(built, tmp_path / "dev", package=built.package)
    _below_the_floor(dev)
    row = tmp_path / "row.json"
    with np.load(built.holdout) as z:
        row.write_text(str([float(v) for v in z["x"][0]]))
    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        assert agent_cli(["predict", "--dir", str(dev.path), str(row)]) == 0
    assert len(_floor_warnings(caplog, dev)) == 1

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # a process of its own each time: each warns, once
        proc = subprocess.run([sys.executable, "-m", "device_agent.cli", "predict", "--dir", str(dev.path), str(row)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("min_window_samples is 5, below the privacy floor of 10") == 1, proc.stderr
