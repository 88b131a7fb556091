"""``worker_stats``: how the service's counters are summed from the workers' files (the real multi-worker
service is ``test_serve_workers.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from device_agent.worker_stats import FOLDER, WorkerStats, combined, reset

OWN: dict[str, Any] = {"device_id": "d", "predictions": 10, "rejected": {"nan": 1}, "windows_held_disk_full": 1,
                       "windows_lost": 0, "outbox": {"depth": 3}}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_counters_add_over_live_and_exited_workers_gauges_over_live_only(tmp_path: Path) -> None:
    reset(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / FOLDER / f"{live.pid}-0a1b2c3d.json").write_text(json.dumps(
            {"predictions": 5, "rejected": {"nan": 2, "wrong_shape": 1}, "windows_held_disk_full": 2}))
        (tmp_path / FOLDER / f"{_dead_pid()}-00000000.json").write_text(json.dumps(
            {"predictions": 7, "rejected": {"nan": 1}, "windows_held_disk_full": 4, "windows_lost": 1}))
        (tmp_path / FOLDER / "123456789-ffffffff.json").write_text("{half-writ")  # unreadable: skipped
        (tmp_path / FOLDER / "notes.json").write_text("{}")  # not a worker's file
        doc = combined(tmp_path, OWN)
    finally:
        live.kill()
        live.wait()
    assert (doc["predictions"], doc["rejected"], doc["windows_lost"]) == (22, {"nan": 4, "wrong_shape": 1}, 1)
    assert doc["windows_held_disk_full"] == 3  # 1 here + 2 live; the exited worker's 4 no longer holds
    assert doc["outbox"] == {"depth": 3} and doc["device_id"] == "d"  # shared state: as this worker reads it
    assert doc["workers"] == {"answering": os.getpid(), "live": 2, "exited": 1}
    assert OWN["predictions"] == 10 and OWN["rejected"] == {"nan": 1}  # the agent's own status is left alone


def test_a_worker_answers_with_what_it_wrote_so_the_sums_never_go_back(tmp_path: Path) -> None:
    reset(tmp_path)
    counters = {"predictions": 10, "rejected": {"nan": 1}, "windows_held_disk_full": 1, "windows_lost": 0}
    stats = WorkerStats(tmp_path, lambda: dict(counters), every=30)
    stats.start()
    assert json.loads(stats.path.read_text()) == counters
    assert stats.path.name.startswith(f"{os.getpid()}-")  # and a random id: a reused pid writes another file
    counters["predictions"] = 12
    doc = stats.service_status({**OWN, **counters})
    assert doc["predictions"] == 12 and json.loads(stats.path.read_text())["predictions"] == 12  # written first
    assert doc["workers"] == {"answering": os.getpid(), "live": 1, "exited": 0}  # its own file counted once

    blocker = stats.path.with_suffix(".tmp")
    blocker.mkdir()  # the next write fails as on a full disk (an OSError, whoever runs the test)
    counters["predictions"] = 15
    doc = stats.service_status({**OWN, **counters})
    assert doc["predictions"] == 12 and stats.failures == 1  # what was written, not the live 15
    blocker.rmdir()
    stats.stop()
    assert json.loads(stats.path.read_text())["predictions"] == 15
    reset(tmp_path)  # serve starting again: the sums start from 0
    assert list((tmp_path / FOLDER).iterdir()) == []
