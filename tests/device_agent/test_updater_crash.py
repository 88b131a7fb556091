"""SIGKILL at every persisted update state: the device serves exactly the old or the new model, never a broken one.

Each case runs the real `device-agent` in a subprocess with the test hook ``EDGEFLEET_FAILPOINT=<state>``
(the updater SIGKILLs itself right after persisting entry to that state), then runs `device-agent status
--json`, which recovers, and checks what the device serves by loading the active slot through the runtime.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.cli import main
from device_agent.config import DeviceDir
from device_agent.updater import FAILPOINT_ENV, TRANSITIONS, Updater, UpdateRecord, UpdateState

from . import copy_device, new_device, only_slots_left, packages, serve

ROOT = Path(__file__).resolve().parents[2]
INSTALL_STATES = ["verifying", "staging", "smoke_test", "activating", "idle"]


def _agent(*args: str, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != FAILPOINT_ENV}
    if failpoint is not None:
        env[FAILPOINT_ENV] = failpoint
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _status(dev: DeviceDir, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["status", "--dir", str(dev.path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def template(built, tmp_path_factory) -> dict[str, DeviceDir]:
    """Devices to copy per case: one serving 1.0.0, one upgraded to 1.1.0 (standby 1.0.0)."""
    pk = packages(built)
    root = tmp_path_factory.mktemp("crash-templates")
    one = new_device(built, root / "one", package=pk.v100)
    two = copy_device(one, root / "two")
    assert Updater(two).install(pk.v110).ok
    return {"one": one, "two": two}


def test_every_install_state_has_a_crash_case():
    # downloading and probation belong to the rollout path; their SIGKILL cases are in test_desired.py.
    assert set(INSTALL_STATES) == {str(s) for s in TRANSITIONS} - {"rolling_back", "downloading", "probation"}


@pytest.mark.parametrize("state", INSTALL_STATES)
def test_install_killed_at_each_state_leaves_the_old_or_the_new_version(built, tmp_path, template, state, capsys):
    pk = packages(built)
    dev = copy_device(template["one"], tmp_path / "dev")

    proc = _agent("install", str(pk.v110), "--dir", str(dev.path), failpoint=state)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert UpdateRecord.load(dev.update_file).state == UpdateState(state)  # persisted on entry, then killed

    st = _status(dev, capsys)  # status runs start-up recovery
    assert st["update"]["state"] == "idle"
    if state == "idle":  # killed after the install finished: the new version, 1.0.0 in standby
        assert (st["active"]["version"], st["standby"]["version"]) == ("1.1.0", "1.0.0")
        assert st["last_result"]["status"] == "installed"
        assert st["recovered"] == []
    else:
        assert st["active"]["version"] == "1.0.0"
        last = st["last_result"]
        assert (last["status"], last["reason"]) == ("failed", "interrupted")
        assert last["message"].startswith(f"interrupted during {state}; serving clinical 1.0.0")
    assert serve(dev) == st["active"]["version"]
    assert only_slots_left(dev)

    after = Updater(dev).install(pk.v200)  # the device updates normally afterwards
    assert after.status == "installed", after.message
    assert serve(dev) == "2.0.0"


def test_rollback_killed_midway_keeps_serving_and_can_be_repeated(tmp_path, template, capsys):
    dev = copy_device(template["two"], tmp_path / "dev")
    proc = _agent("rollback", "--dir", str(dev.path), failpoint="rolling_back")
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    st = _status(dev, capsys)
    assert (st["active"]["version"], st["standby"]["version"]) == ("1.1.0", "1.0.0")
    assert st["last_result"]["message"].startswith("interrupted during rolling_back")
    assert serve(dev) == "1.1.0"

    proc = _agent("rollback", "--dir", str(dev.path))
    assert proc.returncode == 0, proc.stderr
    assert serve(dev) == "1.0.0"


def test_kill_while_unpacking_discards_the_half_written_slot(built, tmp_path, template, capsys):
    """A staging folder cut off midway (as a kill during extraction leaves it) never becomes a slot."""
    dev = copy_device(template["two"], tmp_path / "dev")
    (dev.slots / "a.tmp").mkdir()
    (dev.slots / "a.tmp" / "model.onnx").write_bytes(b"\x08\x01")  # a few bytes of a model, no marker
    rec = UpdateRecord.load(dev.update_file)
    rec.state, rec.candidate = UpdateState.STAGING, {"name": "clinical", "version": "2.0.0", "slot": "a"}
    dev.update_file.write_text(rec.to_json())

    st = _status(dev, capsys)
    assert any("a.tmp" in a for a in st["recovered"])
    assert st["last_result"]["version"] == "2.0.0" and st["last_result"]["reason"] == "interrupted"
    assert (st["active"]["version"], st["standby"]["version"]) == ("1.1.0", "1.0.0")
    assert only_slots_left(dev) and serve(dev) == "1.1.0"
