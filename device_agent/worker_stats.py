"""The counters of ``device-agent serve`` as one service, not one worker.

``serve`` runs several uvicorn worker processes, each with its own agent and counters; a request lands on any
of them, so ``GET /v1/status`` and ``GET /metrics`` used to show whichever worker answered: a Prometheus scrape
saw a counter jump between workers' values. Now each worker writes its counters to ``workers/<pid>-<id>.json``
in the device folder once a second, and the worker that answers first writes its own file and then sums every
worker's file (the approach of prometheus_client's multiprocess mode):

- **Counters** (predictions, rejections by reason, feedback, windows, summaries, failures) are summed over every
  worker of this ``serve``, including workers that have exited (a replaced worker's counts do not vanish). Each
  file only grows and whatever a worker has answered is in its file before it answers, so the sums never go
  back while the service runs, whichever worker answers (a worker that cannot write its file, on a full disk,
  counts with what it last wrote). The other workers' part is at most about a second old; a worker killed
  outright loses its counts since its last write, which no answer had shown.
- **Gauges** (windows held in memory for a full disk) are summed over live workers only (a pid taken by another
  process after a worker exited may count that worker as live: gauges only).
- Shared state (the outbox, the prediction log's files, the device's fields, epsilon spent) is the same for
  every worker and is shown as the answering worker reads it.
- ``serve`` empties ``workers/`` when it starts (it holds the folder's serve lock), so the sums start at 0 with
  the service, as a single process's counters do. Counter resets on a restart are what Prometheus expects.
  Each file name carries a random id besides the pid, so a new worker given an exited worker's pid does not
  overwrite that worker's counts.

The status gains ``workers``: ``{"answering": pid, "live": n, "exited": n}``. Outside ``serve`` (``run``, an
agent in a program) nothing is written and the status is the agent's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["SUMMED", "WorkerStats", "combined", "reset"]

# Status fields that count since the worker started: summed over every worker of the service.
SUMMED = ("predictions", "feedback", "feedback_unmatched", "windows_closed", "summaries_emitted", "windows_held_for_k",
          "windows_recovered", "windows_lost", "summarizer_failures", "reload_failures", "tick_failures")
# Status fields that say how things are now: summed over live workers.
GAUGES = ("windows_held_disk_full",)
FOLDER = "workers"


def reset(device_dir: Path) -> None:
    """Empty the workers' folder (``serve``, before it starts its workers, under the folder's serve lock)."""
    shutil.rmtree(device_dir / FOLDER, ignore_errors=True)
    (device_dir / FOLDER).mkdir(exist_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid now: not our worker
        return False
    return True


def combined(device_dir: Path, own: dict[str, Any], own_file: Path | None = None,
             own_written: dict[str, Any] | None = None, pid: int | None = None) -> dict[str, Any]:
    """``own`` (the answering worker's status) with its counters taken from ``own_written`` (what it last wrote
    to ``own_file``; its live counters when it has written nothing) and every other worker's file added. Files
    that cannot be read (being replaced, damaged) are skipped, never an error."""
    pid = os.getpid() if pid is None else pid
    counted = own_written if own_written is not None else own
    out = {**own, **{k: counted.get(k, own.get(k)) for k in SUMMED}, "rejected": dict(counted.get("rejected") or {})}
    live, exited = 1, 0
    try:
        files = sorted((device_dir / FOLDER).glob("*.json"))
    except OSError:
        files = []
    for f in files:
        try:
            other = int(f.stem.split("-", 1)[0])
        except ValueError:
            continue
        if own_file is not None and f.name == own_file.name:
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        is_live = other != pid and _alive(other)
        live, exited = live + is_live, exited + (not is_live)
        for k in SUMMED + (GAUGES if is_live else ()):
            v = doc.get(k)
            if isinstance(v, int) and isinstance(out.get(k), int):
                out[k] += v
        for reason, v in (doc.get("rejected") or {}).items():
            if isinstance(v, int):
                out["rejected"][reason] = out["rejected"].get(reason, 0) + v
    out["workers"] = {"answering": pid, "live": live, "exited": exited}
    return out


class WorkerStats:
    """A worker's side: ``counters()`` (the agent's ``counter_fields``) written to its file every ``every`` seconds
    by a daemon thread, before every answer (``service_status``), and once more at ``stop()``. Writes replace the
    file whole (write, then rename), one at a time."""

    def __init__(self, device_dir: Path, counters: Any, every: float = 1.0) -> None:
        self.device_dir = device_dir
        self.path = device_dir / FOLDER / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self._counters = counters
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written: dict[str, Any] | None = None  # what the file holds (None until a write succeeded)
        self.failures = 0

    def start(self) -> None:
        self.path.parent.mkdir(exist_ok=True)
        self.write()
        self._thread = threading.Thread(target=self._run, name="worker-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.write()

    def write(self) -> None:
        with self._lock:
            doc = {k: v for k, v in self._counters().items() if k in SUMMED + GAUGES + ("rejected",)}
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(doc))
                os.replace(tmp, self.path)
            except OSError as exc:  # a full disk: this worker counts with what it last wrote; serving goes on
                self.failures += 1
                if self.failures == 1:
                    log.warning("cannot write this worker's counters to %s: %s", self.path, exc)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return
            self.written = doc

    def service_status(self, own: dict[str, Any]) -> dict[str, Any]:
        """What ``/v1/status`` answers under ``serve``: ``own`` (this worker's status), its counters written first,
        then summed with every worker's (``combined``)."""
        self.write()
        return combined(self.device_dir, own, self.path, self.written)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.write()
