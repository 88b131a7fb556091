"""The device's disk fills up: a real 4 MB tmpfs (mounted by this test as root, unmounted afterwards) holds the
whole device folder (config, slots, prediction log, outbox), and a filler file takes every free byte.

While the disk is full the agent keeps serving predictions; every write to the outbox fails with
``OutboxFullError`` ("the disk holding the outbox … is full"), counted (``disk_full`` in the outbox counters and
in the heartbeat); the rows queued before stay; the link cannot mark rows as handed over, so it sends nothing
(and says why in ``last_error``). Windows that close meanwhile are held in memory by the summarizer, merged
into one summary per model version (``windows_held_disk_full``), and retried. When the filler is deleted, the
held windows are written merged into the next stored summary, everything queued is delivered and stored exactly
once, and the server's counts add up to every prediction the device made across the whole period: nothing is
lost, nothing counted twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet_contracts.topics import topic
from tests.brokers import Subscriber
from tests.hardening.fault_fixtures import FLEET, Rig, Traffic, device_totals, rig, server_totals, wait_until
from tests.support import fill, small_tmpfs

__all__ = ["rig"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "fs", "4m") as mnt:
        yield mnt


def test_a_full_disk_keeps_serving_holds_the_windows_and_loses_no_prediction(
        rig: Rig, small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    # On the agent's logger itself: an in-process demo run earlier in the session leaves "edgefleet" at ERROR.
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")
    fleet = rig.fleet(1, "full", root=small_fs, window_count=10, heartbeat_seconds=0.5)
    dev = fleet.devices[0]
    fleet.start()
    agent, link = dev.runner.agent, dev.runner.link
    outbox, summarizer = agent.sink, agent.summarizer
    heartbeats = Subscriber(rig.broker, [topic(FLEET, dev.device_id, "heartbeat")]).start()
    traffic = Traffic(fleet, rig.rows(), batch=5, pause=0.05)
    filler: Path | None = None
    try:
        assert wait_until(lambda: server_totals(rig.server, dev.device_id).rows >= 2, 30, 0.1)
        # Windows queue up while the broker is away; then the disk fills under them.
        rig.broker.stop()
        assert wait_until(lambda: outbox.counters()["summary_rows"] >= 3, 30, 0.05)
        filler = fill(small_fs)
        queued = outbox.counters()["summary_rows"]
        enqueued = device_totals(dev).enqueued
        predictions = agent.counters.predictions
        assert wait_until(lambda: summarizer.windows_held_disk_full >= 2, 30, 0.05), \
            "no window closed while the disk was full"
        # Serving goes on: the second held window closed wholly after the snapshot (the first may have been 9/10
        # full when it was taken), so at least 11 more predictions were made.
        assert agent.counters.predictions >= predictions + 11
        rig.broker.start()
        heartbeats.wait_subscribed(10)
        assert wait_until(lambda: link.state == "connected" and "is full" in (link.last_error or ""), 30, 0.05), \
            (link.state, link.last_error)
        assert wait_until(lambda: any(json.loads(m.payload).get("outbox_disk_full", 0) > 0
                                      for m in heartbeats.messages()), 10, 0.1)
        time.sleep(1.0)  # the link keeps trying; nothing may leave (or be lost) while rows cannot be marked
        c = outbox.counters()
        assert c["summary_rows"] == queued and device_totals(dev).enqueued == enqueued, c
        assert c["disk_full"] >= summarizer.windows_held_disk_full >= 2
        assert "is full" in (outbox.last_error or "")
        st = agent.status()
        assert st["windows_held_disk_full"] >= 2 and st["windows_lost"] == 0 and summarizer.failures == 0, st
        held = [r for r in caplog.records if "is held in memory" in r.getMessage()]
        assert held and "free space on that file system" in held[0].getMessage()

        filler.unlink()  # space frees: the held windows are written, the queue drains, new windows flow again
        filler = None
        assert wait_until(lambda: summarizer.windows_held_disk_full == 0, 30, 0.05)
        assert wait_until(lambda: outbox.counters()["summary_rows"] == 0, 30, 0.1)
        assert wait_until(lambda: device_totals(dev).enqueued > enqueued + 2, 30, 0.1)
    finally:
        traffic.close()
        heartbeats.stop()
        if filler is not None:
            with contextlib.suppress(OSError):
                filler.unlink()
    fleet.flush_windows()
    assert wait_until(lambda: outbox.counters()["summary_rows"] == 0, 30, 0.1)
    dt = device_totals(dev)
    assert wait_until(lambda: server_totals(rig.server, dev.device_id).rows == dt.enqueued, 30, 0.1)
    st = server_totals(rig.server, dev.device_id)
    # Nothing lost: the stored counts add up to every prediction the device made, the full period included.
    assert st.predictions == dt.predictions == agent.counters.predictions
    # Nothing twice: one stored row per summary the outbox took, seqs 1..n without a gap or a repeat.
    assert dt.merged == 0 and st.rows == dt.enqueued and st.seqs == list(range(1, dt.enqueued + 1))
    # Every window that held predictions is in exactly one stored row (1: an empty last window, not summarised).
    assert dt.windows_closed - st.windows in (0, 1) and st.windows > st.rows  # held windows rode merged
    assert summarizer.windows_recovered >= 2 and summarizer.windows_lost == 0 and dt.summarizer_failures == 0
    assert rig.server.quarantine() == []
