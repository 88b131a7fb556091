"""The writer (fleet_server/ingest/writer.py) under failure: a value the store cannot hold is that message's
problem, not the store's (it is quarantined and acknowledged, the others are stored), and HTTP submissions are
answered at once while the store fails instead of waiting behind the MQTT batch being retried. Real store."""

from __future__ import annotations

import threading
import time

from fleet_server.ingest.results import Accepted, Outcome, Submission
from fleet_server.ingest.writer import IngestWriter
from tests.fleet_server.conftest import Fleet
from tests.support import wait_until


def _sub(seq: int, count: int, source: str, got: dict[int, Outcome]) -> Submission:
    body = f'{{"seq": {seq}}}'
    a = Accepted(0, "dev-1", seq, "clinical", "1.0.0", "2026-11-28T00:00:00Z", "2026-11-28T00:01:00Z", count, body)
    return Submission("summary", source, time.time(), summaries=[a], seen=("dev-1",),
                      done=lambda out: got.__setitem__(seq, out))


def test_a_message_the_store_cannot_hold_is_quarantined_and_the_others_are_stored(fleet: Fleet) -> None:
    writer = IngestWriter(fleet.settings, fleet.store)
    got: dict[int, Outcome] = {}
    writer.start()
    try:
        for seq, count in ((1, 10), (2, 2**63), (3, 10)):  # 2**63 does not fit SQLite's INTEGER
            writer.submit(_sub(seq, count, "mqtt", got))
        assert wait_until(lambda: len(got) == 3, 10), got
    finally:
        assert writer.stop(10)
    assert all(o.error is None for o in got.values()), got  # every one acknowledged: none delivered again
    assert fleet.seqs("dev-1") == [1, 3]
    assert [r.reason for r in got[2].rejected] == ["internal"] and "the store refused it" in got[2].rejected[0].detail
    assert [q["reason"] for q in fleet.quarantined()] == ["internal"]
    assert writer.failing_since is None


def test_http_submissions_are_answered_at_once_while_an_mqtt_batch_waits_for_the_store(fleet: Fleet) -> None:
    writer = IngestWriter(fleet.settings, fleet.store, retries=0)
    got: dict[int, Outcome] = {}
    with fleet.store.write() as c:  # every insert fails, as on a full disk
        c.execute("CREATE TRIGGER broken BEFORE INSERT ON summaries BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    writer.start()
    try:
        writer.submit(_sub(1, 10, "mqtt", got))
        assert wait_until(lambda: writer.failing_since is not None, 10)
        t0 = time.monotonic()
        writer.submit(_sub(2, 10, "http", got))
        assert 2 in got and time.monotonic() - t0 < 1.0  # at once, not after the HTTP route's 30 s
        assert "the store is failing" in (got[2].error or "") and "disk full" in (got[2].error or "")
        assert 1 not in got and writer.pending == 1  # the MQTT one is kept, unacknowledged
        with fleet.store.write() as c:
            c.execute("DROP TRIGGER broken")
        assert wait_until(lambda: 1 in got, 15) and got[1].error is None and got[1].accepted == 1
    finally:
        assert writer.stop(10)
    assert fleet.seqs("dev-1") == [1]


def test_stop_ends_a_batch_being_retried_and_a_restarted_writer_retries_again(fleet: Fleet) -> None:
    writer = IngestWriter(fleet.settings, fleet.store, retries=0)
    got: dict[int, Outcome] = {}
    with fleet.store.write() as c:
        c.execute("CREATE TRIGGER broken BEFORE INSERT ON summaries BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    writer.start()
    writer.submit(_sub(1, 10, "mqtt", got))
    assert wait_until(lambda: writer.failing_since is not None, 10)
    done = threading.Event()
    threading.Thread(target=lambda: (writer.stop(10), done.set()), daemon=True).start()
    assert done.wait(15)
    assert got[1].error is not None and writer.pending == 0  # given up unacknowledged: the broker keeps it
    writer.start()  # started again, it retries again rather than giving up
    writer.submit(_sub(2, 10, "mqtt", got))
    time.sleep(0.5)
    assert 2 not in got
    with fleet.store.write() as c:
        c.execute("DROP TRIGGER broken")
    assert wait_until(lambda: 2 in got, 15) and got[2].error is None
    assert writer.stop(10)
    assert fleet.seqs("dev-1") == [2]
