"""The runner's periodic report check: it rebuilds the report only when a file the report is built from changed,
and then queues it if it differs; every change on disk (active slot, update state, desired seq) still reaches the
outbox; a forced report (after a desired-state decision or an update-state change) is always queued.

Real provisioned device folders, real packages installed and rolled back by the real updater, the real outbox.
The runner has no broker (the report stays queued) and no housekeeping thread: the tests call
``check_report()`` themselves, as the fleet simulator does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import DeviceDir
from device_agent.desired_handler import DESIRED_FILE, DesiredRecord
from device_agent.outbox import REPORT, Outbox
from device_agent.runner import DeviceRunner, ReportInputs
from device_agent.updater import Updater, UpdateRecord, UpdateState

from . import new_device, packages

SETTLE = 0.05  # the runner's settle time here; the tests wait SETTLE * 2 after a change before relying on it


def queued_report(runner: DeviceRunner) -> tuple[int, dict[str, Any]]:
    """(outbox row id, document) of the report waiting in the outbox (a new report replaces the row)."""
    sink = runner.agent.sink
    assert isinstance(sink, Outbox)
    rows = [r for r in sink.peek(1000) if r.kind == REPORT]
    assert len(rows) == 1, rows
    return rows[0].id, rows[0].document()


def settled() -> None:
    time.sleep(SETTLE * 2)


@pytest.fixture
def device(built: Any, tmp_path: Path) -> DeviceDir:
    return new_device(built, tmp_path / "dev", package=built.package)


@pytest.fixture
def runner(device: DeviceDir) -> Iterator[DeviceRunner]:
    r = DeviceRunner(device.path, http=False, housekeeping=False, report_settle_seconds=SETTLE)
    r.start()
    try:
        settled()
        r.check_report()  # the first settled fingerprint
        yield r
    finally:
        r.stop()


def test_an_unchanged_device_does_not_rebuild_its_report(runner: DeviceRunner) -> None:
    before, row = runner.report_rebuilds, queued_report(runner)[0]
    for _ in range(5):
        runner.check_report()
    assert runner.report_rebuilds == before
    assert queued_report(runner)[0] == row


def test_a_desired_seq_written_alone_is_reported(runner: DeviceRunner, device: DeviceDir) -> None:
    assert queued_report(runner)[1]["desired_seq"] == 0
    before = runner.report_rebuilds
    DesiredRecord(last_seq=7).save(device.path / DESIRED_FILE)  # no other file changes
    settled()
    runner.check_report()
    assert runner.report_rebuilds == before + 1
    assert queued_report(runner)[1]["desired_seq"] == 7


def test_an_update_state_written_on_disk_is_reported(runner: DeviceRunner, device: DeviceDir) -> None:
    rec = UpdateRecord.load(device.update_file)
    rec.state, rec.reason = UpdateState.DOWNLOADING, "written by hand"
    device.update_file.write_text(rec.to_json())  # in place, not atomic: size and mtime still tell
    settled()
    runner.check_report()
    assert queued_report(runner)[1]["update_state"] == "downloading"


def test_an_install_and_a_rollback_outside_the_runner_are_reported(built: Any, runner: DeviceRunner,
                                                                   device: DeviceDir) -> None:
    rep = queued_report(runner)[1]
    assert (rep["active"], rep["standby"]) == ({"name": "clinical", "version": "1.0.0"}, None)
    assert Updater(device).install(packages(built).v110).status == "installed"  # no hook: nothing forced
    settled()
    runner.check_report()
    rep = queued_report(runner)[1]
    assert rep["active"]["version"] == "1.1.0" and rep["standby"]["version"] == "1.0.0"
    assert rep["last_result"]["status"] == "installed"

    assert Updater(device).rollback().status == "rolled_back"
    settled()
    runner.check_report()
    rep = queued_report(runner)[1]
    assert rep["active"]["version"] == "1.0.0" and rep["standby"]["version"] == "1.1.0"
    assert rep["last_result"]["status"] == "rolled_back"


def test_a_standby_model_file_removed_is_reported(built: Any, runner: DeviceRunner, device: DeviceDir) -> None:
    Updater(device).install(packages(built).v110)
    settled()
    runner.check_report()
    standby = queued_report(runner)[1]["standby"]
    assert standby["version"] == "1.0.0"
    slot = Updater(device).slots.standby()
    assert slot is not None
    (slot[0] / slot[1].model_file).unlink()  # the standby is no longer ready
    settled()
    runner.check_report()
    assert queued_report(runner)[1]["standby"] is None


def test_changes_within_the_settle_time_are_not_missed(runner: DeviceRunner, device: DeviceDir) -> None:
    # Two in-place writes of the same size (same inode), quickly after each other: their timestamps may be equal
    # (a file system's granularity), so a fingerprint this fresh is not trusted and the report is rebuilt.
    path = device.path / DESIRED_FILE
    path.write_text(DesiredRecord(last_seq=7).to_json())
    runner.check_report()
    assert queued_report(runner)[1]["desired_seq"] == 7
    path.write_text(DesiredRecord(last_seq=8).to_json())
    runner.check_report()
    assert queued_report(runner)[1]["desired_seq"] == 8
    settled()
    runner.check_report()
    before = runner.report_rebuilds
    runner.check_report()
    assert runner.report_rebuilds == before


def test_a_forced_report_is_queued_even_when_nothing_changed(runner: DeviceRunner) -> None:
    row, doc = queued_report(runner)
    runner.publish_report_if_changed(force=True)  # what follows every desired-state decision and update state
    new_row, new_doc = queued_report(runner)
    assert new_row != row
    assert {k: v for k, v in new_doc.items() if k != "at"} == {k: v for k, v in doc.items() if k != "at"}


def test_every_input_of_the_report_is_in_the_fingerprint(device: DeviceDir) -> None:
    inputs = ReportInputs(device, settle_seconds=0)
    paths = [device.config_file, device.target_file, device.root_pub, device.fleet_pub, device.trust_file,
             device.update_file, device.active_file, device.path / DESIRED_FILE, device.slot("a") / ".complete",
             device.slot("a") / ".smoke.json", device.slot("a") / "manifest.json"]
    for path in paths:
        before = inputs.take()
        data = path.read_bytes() if path.exists() else b""
        path.write_bytes(data + b" ")  # one byte longer: a different fingerprint whatever the timestamps
        assert inputs.take() != before, path
        path.write_bytes(data)


def test_the_periodic_check_moves_an_idle_devices_clock_mark_to_the_present(device: DeviceDir) -> None:
    """The trust store's high-water mark follows the clock on an idle device (no install, no desired state), so
    a clock set back later is judged against a recent time."""
    from datetime import timedelta

    from device_agent.trust_store import TrustState, TrustStore
    from edgefleet_contracts.timeutil import utcnow

    old = TrustStore(device).state
    week_ago = utcnow() - timedelta(days=7)
    device.trust_file.write_text(TrustState(old.keyset_envelope, old.keyset_version, week_ago).to_json())
    r = DeviceRunner(device.path, http=False, housekeeping=False, report_settle_seconds=SETTLE)
    try:
        r.check_report()
    finally:
        r.stop()
    mark = TrustStore(device).state.high_water
    assert mark > utcnow() - timedelta(minutes=1), mark
    assert TrustStore(device).state.clock_went_back == 0
    assert TrustStore(device, clock=lambda: week_ago).now() == mark  # the clock set back: judged at the mark
