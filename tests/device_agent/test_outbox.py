"""The outbox: durable, atomic, bounded by merging (never by dropping), latest report only."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from device_agent.outbox import REPORT, SUMMARY, Outbox, OutboxError
from edgefleet_contracts.summary import Summary
from tests.device_agent.conftest import SummaryFactory


def summaries_in(outbox: Outbox) -> list[Summary]:
    return [Summary.from_dict(r.document()) for r in outbox.peek(10_000) if r.kind == SUMMARY]


def test_rows_meta_and_counters_survive_close_and_reopen(tmp_path: Path, make_summary: SummaryFactory) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, max_rows=100) as ob:
        for seq in (1, 2, 3):
            with ob.transaction() as tx:
                tx.put_summary(make_summary(seq))
                tx.set_meta("seq", str(seq))
        with ob.transaction() as tx:
            tx.put_report({"device_id": "dev-1", "active": "clinical 1.0.0"})
        first = ob.peek(10)

    with Outbox(path, max_rows=100) as ob:
        assert ob.peek(10) == first
        assert [r.kind for r in first] == [SUMMARY, SUMMARY, SUMMARY, REPORT]
        assert [r.seq for r in first[:3]] == [1, 2, 3]
        assert ob.get_meta("seq") == "3"
        assert ob.depth() == 4
        assert ob.schema_version == 1
        assert summaries_in(ob)[0] == make_summary(1)  # body round-trips through Summary.from_dict
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bound_is_kept_by_merging_the_oldest_rows(tmp_path: Path, make_summary: SummaryFactory) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=3) as ob:
        for seq in range(1, 6):
            with ob.transaction() as tx:
                tx.put_summary(make_summary(seq, count=10 * seq))

        rows = ob.peek(100)
        assert len(rows) == 3
        merged, *rest = summaries_in(ob)
        # seqs 1, 2 merged into one, then that with 3: later seq kept, counts add, windows counted
        assert merged.seq == 3
        assert merged.windows == 3
        assert merged.count == 10 + 20 + 30
        assert sum(merged.latency_counts) == 60
        assert merged.features[0].n == 60
        assert merged.errors == {"invalid_input": 3}
        assert merged.start == make_summary(1).start and merged.end == make_summary(3).end
        assert [s.seq for s in rest] == [4, 5]
        assert [r.seq for r in rows] == [3, 4, 5]  # still in seq order
        assert ob.counters()["merged_total"] == 2
        assert ob.counters()["overflow_unmergeable"] == 0
        # nothing was lost: every prediction counted once
        assert sum(s.count for s in summaries_in(ob)) == sum(10 * s for s in range(1, 6))
        windows = ob._conn.execute("SELECT windows FROM outbox ORDER BY id").fetchall()
        assert [w for (w,) in windows] == [3, 1, 1]


def test_merging_pairs_rows_of_the_same_model_version_and_keeps_seq_order(
        tmp_path: Path, make_summary: SummaryFactory) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=3) as ob:
        for seq, version in [(1, "1.0.0"), (2, "2.0.0"), (3, "1.0.0"), (4, "2.0.0")]:
            with ob.transaction() as tx:
                tx.put_summary(make_summary(seq, version=version))
        got = [(s.seq, s.version, s.windows) for s in summaries_in(ob)]
        # 1 and 3 (the oldest pair of one version) merged, in the later row's place: seqs stay ascending
        assert got == [(2, "2.0.0", 1), (3, "1.0.0", 2), (4, "2.0.0", 1)]


def test_unmergeable_overflow_is_counted_and_nothing_is_dropped(tmp_path: Path, make_summary: SummaryFactory) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=2) as ob:
        for seq, version in [(1, "1.0.0"), (2, "2.0.0"), (3, "3.0.0"), (4, "4.0.0")]:
            with ob.transaction() as tx:
                tx.put_summary(make_summary(seq, version=version))
        assert [s.seq for s in summaries_in(ob)] == [1, 2, 3, 4]
        assert ob.counters()["overflow_unmergeable"] == 2
        assert ob.counters()["merged_total"] == 0
        # a later row of a version already queued can be merged again: the bound comes back
        with ob.transaction() as tx:
            tx.put_summary(make_summary(5, version="1.0.0"))
        assert [s.seq for s in summaries_in(ob)] == [2, 3, 4, 5]
        assert ob.counters()["merged_total"] == 1


def test_rows_handed_to_the_broker_are_never_merged(tmp_path: Path, make_summary: SummaryFactory) -> None:
    # The server may already hold a row that was sent but not acknowledged: merging it would count it twice.
    with Outbox(tmp_path / "o.sqlite", max_rows=2) as ob:
        with ob.transaction() as tx:
            tx.put_summary(make_summary(1))
            tx.put_summary(make_summary(2))
        assert ob.claim(ob.peek(10))
        with ob.transaction() as tx:
            tx.put_summary(make_summary(3))
        assert [(s.seq, s.windows) for s in summaries_in(ob)] == [(1, 1), (2, 1), (3, 1)]
        assert ob.counters()["overflow_unmergeable"] == 1
        with ob.transaction() as tx:
            tx.put_summary(make_summary(4))
        assert [(s.seq, s.windows) for s in summaries_in(ob)] == [(1, 1), (2, 1), (4, 2)]


def test_rows_merged_or_replaced_after_they_were_read_are_not_claimed_for_sending(
        tmp_path: Path, make_summary: SummaryFactory) -> None:
    # The link reads rows, signs them, then claims them. A merge in between (the row bound) would otherwise send
    # window 1 alone and again inside the merged row: the server would count its predictions twice.
    with Outbox(tmp_path / "o.sqlite", max_rows=2) as ob:
        with ob.transaction() as tx:
            tx.put_summary(make_summary(1))
            tx.put_summary(make_summary(2))
        read = ob.peek(10)
        with ob.transaction() as tx:
            tx.put_summary(make_summary(3))  # over the bound: rows 1 and 2 merge
        assert not ob.claim(read)
        assert [(s.seq, s.windows) for s in summaries_in(ob)] == [(2, 2), (3, 1)]
        fresh = ob.peek(10)
        assert ob.claim(fresh)  # unchanged since read: claimed, and from now on never merged
        with ob.transaction() as tx:
            tx.put_summary(make_summary(4))
        assert [(s.seq, s.windows) for s in summaries_in(ob)] == [(2, 2), (3, 1), (4, 1)]
        assert ob.counters()["overflow_unmergeable"] == 1

    with Outbox(tmp_path / "r.sqlite", max_rows=10) as ob:
        with ob.transaction() as tx:
            tx.put_report({"device_id": "dev-1", "n": 1})
        read = ob.peek(10)
        with ob.transaction() as tx:
            tx.put_report({"device_id": "dev-1", "n": 2})  # replaces the unsent one
        assert not ob.claim(read)
        assert ob.claim(ob.peek(10)) and ob.peek(10)[0].document()["n"] == 2


def test_a_new_report_replaces_the_queued_one(tmp_path: Path, make_summary: SummaryFactory) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=10) as ob:
        with ob.transaction() as tx:
            tx.put_report({"state": "old"})
            tx.put_summary(make_summary(1))
        with ob.transaction() as tx:
            tx.put_report({"state": "new"})
        rows = ob.peek(10)
        assert [r.kind for r in rows] == [SUMMARY, REPORT]
        assert json.loads(rows[1].body) == {"state": "new"}
        assert ob.counters()["report_rows"] == 1


def test_an_exception_inside_a_transaction_leaves_nothing(tmp_path: Path, make_summary: SummaryFactory) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=10) as ob:
        with ob.transaction() as tx:
            tx.set_meta("seq", "1")
        with pytest.raises(RuntimeError, match="window close failed"), ob.transaction() as tx:
            tx.put_summary(make_summary(2))
            tx.put_report({"state": "x"})
            tx.set_meta("seq", "2")
            raise RuntimeError("window close failed")
        assert ob.depth() == 0
        assert ob.get_meta("seq") == "1"
        with ob.transaction() as tx:  # the connection is usable afterwards
            assert tx.get_meta("seq") == "1"


def test_peek_after_id_and_ack_delete_only_what_was_acknowledged(
        tmp_path: Path, make_summary: SummaryFactory) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=10) as ob:
        with ob.transaction() as tx:
            for seq in range(1, 6):
                tx.put_summary(make_summary(seq))
        rows = ob.peek(2)
        assert [r.seq for r in rows] == [1, 2]
        assert [r.seq for r in ob.peek(10, after_id=rows[-1].id)] == [3, 4, 5]
        assert ob.ack([rows[0].id, rows[1].id, 999]) == 2
        assert [r.seq for r in ob.peek(10)] == [3, 4, 5]
        assert ob.ack([]) == 0


def test_two_writers_on_one_file_wait_for_each_other(tmp_path: Path, make_summary: SummaryFactory) -> None:
    path = tmp_path / "o.sqlite"
    errors: list[BaseException] = []

    def writer(first_seq: int) -> None:
        try:
            with Outbox(path, max_rows=10_000) as ob:
                for seq in range(first_seq, first_seq + 40):
                    with ob.transaction() as tx:  # read, then write: what a deferred BEGIN cannot survive
                        done = int(tx.get_meta("done") or 0)
                        time.sleep(0.001)  # let the other writer try to come in between
                        tx.put_summary(make_summary(seq))
                        tx.set_meta("done", str(done + 1))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 1001)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Outbox(path, max_rows=10_000) as ob:
        assert ob.depth() == 80
        assert ob.get_meta("done") == "80"  # no lost update


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    Outbox(path, max_rows=10).close()
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(OutboxError, match="schema version 99"):
        Outbox(path, max_rows=10)


def test_a_file_that_is_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox(path, max_rows=10)
