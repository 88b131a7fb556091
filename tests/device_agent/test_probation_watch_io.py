"""The probation watch reads the device folder at most once a second, however often it polls the counts; a desired
state that arrives (``wake``) is still looked at at once.

Why it matters: the fleet simulator runs hundreds of watches in one process. Reading update.json, desired.json and
the slot's smoke files ten times a second each kept that process's threads queueing for the interpreter lock, and
every install there slowed down with the number of devices on probation (fleet load: 1,000 devices, most still
idle after 600 s). Real device folder, real updater, real packages; the two callables the watch is given are
counted.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from device_agent.desired_handler.watch import watch
from device_agent.probation import ProbationPolicy
from device_agent.updater import Updater, UpdateRecord, UpdateState
from edgefleet_contracts.desired import Desired
from edgefleet_contracts.timeutil import utcnow

from . import packages
from .test_desired import provisioned


def _on_probation(built: Any, tmp_path: Any) -> tuple[Updater, dict[str, Any]]:
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    r = Updater(dev).install(pk.v110, probation=ProbationPolicy(seconds=60).to_dict())
    assert (r.status, r.version) == ("probation", "1.1.0")
    rec = UpdateRecord.load(dev.update_file)
    assert rec.state == UpdateState.PROBATION
    return Updater(dev), dict(rec.candidate or {}, seq=1)


class Counted:
    def __init__(self, f: Any) -> None:
        self.f, self.calls = f, 0

    def __call__(self, *a: Any) -> Any:
        self.calls += 1
        return self.f(*a)


def test_the_watch_reads_the_device_folder_at_most_once_a_second_however_often_it_polls(built, tmp_path):
    up, cand = _on_probation(built, tmp_path)
    accepted = Counted(lambda: None)
    record = up.record = Counted(up.record)  # type: ignore[method-assign]
    t0 = time.monotonic()
    verdict = watch(up, None, ProbationPolicy(seconds=2.5, predictions=10**6), None, "clinical", "1.1.0",
                    cand["slot"], cand, stop=threading.Event(), poll=0.01, reload_agent=lambda: None,
                    accepted=accepted, wake=threading.Event(), files_every=1.0)
    took = time.monotonic() - t0
    assert verdict is not None and verdict.outcome == "pass" and 2.5 <= took < 6
    # about 250 polls; the folder is read at the start and then once a second (at most 4 times in 2.5 s, with
    # slack for a slow machine). Before: every poll read both files, ~250 times each.
    assert accepted.calls <= 5 and record.calls <= 5, (accepted.calls, record.calls)


def test_a_desired_state_that_arrives_is_looked_at_at_once_not_at_the_next_file_check(built, tmp_path):
    up, cand = _on_probation(built, tmp_path)
    now = utcnow()
    back = Desired(device_id="dev-1", seq=2, name="clinical", version="1.0.0", url="http://127.0.0.1:9/p",
                   sha256="0" * 64, length=1, issued=now, expires=now, reason="rollout aborted")
    newest: list[Desired | None] = [None]
    wake = threading.Event()

    def arrive() -> None:
        time.sleep(0.3)
        newest[0] = back
        wake.set()  # what DesiredHandler.receive does

    threading.Thread(target=arrive, daemon=True).start()
    t0 = time.monotonic()
    verdict = watch(up, None, ProbationPolicy(seconds=60, predictions=10**6), None, "clinical", "1.1.0",
                    cand["slot"], cand, stop=threading.Event(), poll=5.0, reload_agent=lambda: None,
                    accepted=lambda: newest[0], wake=wake, files_every=30.0)
    assert verdict is not None and (verdict.outcome, verdict.reason) == ("fail", "desired_rollback")
    assert time.monotonic() - t0 < 3  # not after the 5 s poll nor the 30 s file check
