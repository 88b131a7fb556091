"""Fixtures and accounting for the fault tests (``test_fault_*.py``).

A *rig* is a real Mosquitto (persistence on, so its queue survives a clean stop) and a real ``fleet-server
serve`` process (``tests.hardening.server_proc.ServerProcess``, stopped by its PID), plus fleets of simulated
devices built from the real agent code (``fleet_server.simulator``: device folders, keys, outbox, MQTT link).

The accounting compares what the devices say they produced with what the server stored:

- a device's summaries enqueued = its outbox ``next_seq - 1``; each was one closed window, or several when the
  outbox merged never-sent rows (the merged row keeps the later ``seq`` and adds ``windows``);
- the server stores one row per ``(device_id, seq)`` (primary key). Exactly once means: the stored rows'
  ``windows`` add up to the device's summaries enqueued, their ``count`` to its predictions, and stored rows +
  rows merged away = summaries enqueued (a row that was sent and then merged as well would break the sums).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.simulator import Fleet, SimConfig, SimDevice, rows_sampler
from tests.brokers import Mosquitto
from tests.hardening.server_proc import FLEET, ServerProcess, wait_until

__all__ = ["FLEET", "DeviceTotals", "Rig", "ServerTotals", "Traffic", "assert_exactly_once", "device_totals", "rig",
           "server_totals", "wait_until"]


@dataclass
class Rig:
    folder: Path
    broker: Mosquitto
    server: ServerProcess
    built: Any
    fleets: list[Fleet]

    def fleet(self, n: int, prefix: str, root: Path | None = None, **sim: Any) -> Fleet:
        """Provision ``n`` devices (1.0.0 installed, enrolled over the API) under ``root``; not started."""
        cfg = SimConfig(root=root or self.folder / prefix, server_url=self.server.url, broker_url=self.broker.url,
                        operator_token=self.server.tokens["operator"], root_pub=self.built.keys / "root.pub",
                        fleet_pub=self.server.data / "keys" / "fleet.pub", devices=n,
                        first_package=self.built.package, fleet=FLEET, prefix=prefix,
                        **{"min_window_samples": 1, "allow_small_windows": True, "window_count": 10, **sim})
        f = Fleet(cfg)
        f.provision()
        self.fleets.append(f)
        return f

    def rows(self) -> np.ndarray:
        with np.load(self.built.holdout) as z:
            return np.asarray(z["x"], dtype=np.float32)


@pytest.fixture
def rig(tmp_path: Path, built: Any) -> Iterator[Rig]:
    broker = Mosquitto(tmp_path / "mosquitto", persistence=True).start()
    server = ServerProcess.create(tmp_path, broker, built).start()
    r = Rig(tmp_path, broker, server, built, [])
    try:
        yield r
    finally:
        for f in r.fleets:
            f.stop()
        server.stop()
        broker.close()


class Traffic:
    """Every device of ``fleet`` keeps predicting (``batch`` rows per round) until ``close()``; bounded by
    ``max_seconds`` and ``max_rounds`` whatever happens."""

    def __init__(self, fleet: Fleet, x: np.ndarray, *, batch: int = 7, pause: float = 0.02,
                 max_seconds: float = 120.0, max_rounds: int = 100_000) -> None:
        self.fleet, self.sample, self.batch, self.pause = fleet, rows_sampler(x, 11), batch, pause
        self.deadline = time.monotonic() + max_seconds
        self.max_rounds = max_rounds
        self.rounds = 0
        self.made = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.rounds < self.max_rounds and time.monotonic() < self.deadline:
            self.made += self.fleet.stream(self.sample, self.batch, workers=2)
            self.rounds += 1
            self._stop.wait(self.pause)

    def wait_rounds(self, n: int, timeout: float) -> bool:
        start = self.rounds
        return wait_until(lambda: self.rounds >= start + n, timeout, 0.05)

    def close(self) -> int:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "traffic did not stop"
        return self.made


@dataclass(frozen=True)
class DeviceTotals:
    enqueued: int  # summaries the device put in its outbox (next_seq - 1)
    merged: int  # outbox rows merged away (merged_total)
    predictions: int
    queued_summaries: int  # summary rows still in the outbox
    windows_closed: int
    summarizer_failures: int


def device_totals(d: SimDevice) -> DeviceTotals:
    agent = d.runner.agent
    ob = agent.sink
    c = ob.counters()
    return DeviceTotals(int(ob.get_meta("next_seq") or "1") - 1, c["merged_total"], agent.counters.predictions,
                        c["summary_rows"], agent.counters.windows_closed, agent.summarizer.failures)


@dataclass(frozen=True)
class ServerTotals:
    rows: int
    windows: int
    predictions: int
    seqs: list[int]


def server_totals(server: ServerProcess, device: str) -> ServerTotals:
    got = server.db("SELECT seq, count, body FROM summaries WHERE device_id = ? ORDER BY seq", (device,))
    windows = sum(int(json.loads(b)["window"].get("windows", 1)) for _, _, b in got)
    return ServerTotals(len(got), windows, sum(int(c) for _, c, _ in got), [int(s) for s, _, _ in got])


def assert_exactly_once(server: ServerProcess, fleet: Fleet, timeout: float = 60.0,
                        settle: Callable[[], None] | None = None) -> dict[str, tuple[DeviceTotals, ServerTotals]]:
    """Wait (bounded) until every device's outbox is empty of summaries and the server holds all of them, then
    check the exactly-once sums per device. Returns the totals per device."""

    def drained() -> bool:
        return all(device_totals(d).queued_summaries == 0 for d in fleet.devices)

    assert wait_until(drained, timeout, 0.2), {d.device_id: device_totals(d) for d in fleet.devices}

    def stored_all() -> bool:
        return all(server_totals(server, d.device_id).windows >= device_totals(d).enqueued for d in fleet.devices)

    wait_until(stored_all, timeout, 0.2)
    if settle is not None:
        settle()
    out = {}
    for d in fleet.devices:
        dt, st = device_totals(d), server_totals(server, d.device_id)
        out[d.device_id] = (dt, st)
        assert dt.enqueued > 0, f"{d.device_id} closed no window"
        assert st.windows == dt.enqueued, f"{d.device_id}: server holds {st.windows} windows, device enqueued {dt}"
        assert st.rows + dt.merged == dt.enqueued, f"{d.device_id}: {st.rows} rows + {dt.merged} merged != {dt}"
        assert st.predictions == dt.predictions, f"{d.device_id}: server {st.predictions} predictions vs {dt}"
        assert st.seqs == sorted(set(st.seqs)) and (not st.seqs or st.seqs[-1] == dt.enqueued)
        assert dt.summarizer_failures == 0
    return out
