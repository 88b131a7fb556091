"""Windows that close while the disk is full are held in memory and merged into the next window written.

Real parts throughout: the clinical package's model and profile, real ``Window`` objects, a real SQLite
``Outbox``. The disk is made full with SQLite's own size cap (``PRAGMA max_page_count`` set to the file's
current size): every write that needs a new page fails with SQLITE_FULL ("database or disk is full"), the error
a full file system gives, through the same path in ``Outbox`` (``OutboxFullError``). The end-to-end test on a
real full file system is ``tests/hardening/test_fault_disk_full.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.http_api import prometheus_text
from device_agent.model import LoadedModel, load_model
from device_agent.outbox import Outbox
from device_agent.summarizer import Closed, Summarizer, add_laplace_noise
from device_agent.window import Window
from edgefleet_contracts.summary import Summary, merge
from edgefleet_contracts.targets import get_target
from edgefleet_contracts.timeutil import fmt
from tests.conftest import extract

TARGET = get_target("x86_64-avx2")
T0 = datetime(2026, 3, 1, tzinfo=UTC)
NO_CAP = 4294967294  # SQLite's largest max_page_count (it clamps to what it supports)


@pytest.fixture()
def model(built, tmp_path: Path) -> LoadedModel:
    return load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), TARGET)


@pytest.fixture()
def rows(built) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"], dtype=np.float32)


@pytest.fixture()
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite", max_rows=100) as ob:
        yield ob


@contextmanager
def disk_full(outbox: Outbox) -> Iterator[None]:
    """Cap the outbox file at its current size for the block (see the module docstring)."""
    with outbox._lock:  # the outbox's own connection: the cap is per connection
        pages = outbox._conn.execute("PRAGMA page_count").fetchone()[0]
        outbox._conn.execute(f"PRAGMA max_page_count = {pages}")
    try:
        yield
    finally:
        with outbox._lock:
            outbox._conn.execute(f"PRAGMA max_page_count = {NO_CAP}")


def window(model: LoadedModel, rows: np.ndarray, n: int, i: int, version: str = "1.0.0") -> Closed:
    """Window ``i``: ``n`` rows from the holdout, deterministic outputs and latency, minute ``i`` after T0."""
    x = rows[(7 * i) % len(rows):][:n]
    assert len(x) == n
    w = Window(model.profile, model.calibration, model.validator.lows, model.validator.highs)
    p = np.random.default_rng(i).dirichlet(np.ones(len(model.profile.classes)), n)
    w.observe_many(x, p, np.full(n, 1_000_000, dtype=np.int64))
    start = T0 + timedelta(minutes=i)
    return Closed(w, model.name, version, fmt(start), fmt(start + timedelta(minutes=1)))


def exact(model: LoadedModel, rows: np.ndarray, parts: list[tuple[int, int]]) -> Summary:
    """What the windows ``(n, i)`` add up to, merged without any outbox (a second, independent build)."""
    out: Summary | None = None
    for n, i in parts:
        c = window(model, rows, n, i)
        s = c.window.to_summary("dev-1", c.model, c.version, 0, c.start, c.end)
        out = s if out is None else merge(out, s)
    assert out is not None
    return out


def stored(outbox: Outbox) -> list[Summary]:
    return [Summary.from_dict(r.document()) for r in outbox.peek(100) if r.kind == "summary"]


def histograms(s: Summary) -> tuple[list[list[int]], list[int], list[int]]:
    return [f.counts for f in s.features], s.class_counts, s.confidence_counts


def test_windows_closed_while_the_disk_is_full_are_held_and_the_next_stored_summary_carries_them_all(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    s = Summarizer("dev-1", outbox, k=1)
    try:
        assert s.close(window(model, rows, 5, 0)) is not None  # seq 1, before the disk fills
        with disk_full(outbox):
            assert s.close(window(model, rows, 7, 1)) is None
            assert s.close(window(model, rows, 8, 2)) is None
            assert outbox.counters()["disk_full"] >= 2  # the writes really failed for lack of space
            assert (s.windows_held_disk_full, s.windows_recovered, s.windows_lost) == (2, 0, 0)
            assert len(stored(outbox)) == 1 and outbox.get_meta("next_seq") == "2"  # nothing written, no seq used
        assert any("is held in memory" in r.getMessage() and "free space" in r.getMessage() for r in caplog.records)
        out = s.close(window(model, rows, 9, 3))  # space is back: one summary for the three windows
        got = stored(outbox)
        assert out is not None and [g.seq for g in got] == [1, 2] and outbox.get_meta("next_seq") == "3"
        want = exact(model, rows, [(7, 1), (8, 2), (9, 3)])
        assert (got[1].count, got[1].windows) == (24, 3) == (want.count, want.windows)
        assert histograms(got[1]) == histograms(want)
        assert [f.n for f in got[1].features] == [f.n for f in want.features]
        assert (got[1].start, got[1].end) == (want.start, want.end)
        assert (s.windows_held_disk_full, s.windows_recovered, s.windows_lost, s.failures) == (0, 2, 0, 0)
        assert s.emitted == 2
    finally:
        s.stop()


def test_held_windows_are_written_by_the_periodic_retry_without_waiting_for_a_new_window(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox) -> None:
    s = Summarizer("dev-1", outbox, k=1, retry_seconds=0.05)
    try:
        with disk_full(outbox):
            c = window(model, rows, 6, 1)
            c.done = threading.Event()
            s.submit(c)
            assert c.done.wait(10)
            time.sleep(0.2)  # a few retries against the full disk: still held, nothing counted as failed
            assert (s.windows_held_disk_full, s.failures, len(stored(outbox))) == (1, 0, 0)
        deadline = time.monotonic() + 10
        while not stored(outbox) and time.monotonic() < deadline:
            time.sleep(0.02)
        got = stored(outbox)
        assert [(g.seq, g.count, g.windows) for g in got] == [(1, 6, 1)]
        assert histograms(got[0]) == histograms(exact(model, rows, [(6, 1)]))
        assert (s.windows_held_disk_full, s.windows_recovered) == (0, 1)
    finally:
        s.stop()


def test_a_window_held_for_a_full_disk_joins_the_k_anonymity_hold_and_is_sent_once_k_is_reached(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox) -> None:
    s = Summarizer("dev-1", outbox, k=20)
    try:
        with disk_full(outbox):
            assert s.close(window(model, rows, 7, 1)) is None
        assert s.close(window(model, rows, 8, 2)) is None  # 15 < k: persisted as the version's k-held window
        assert stored(outbox) == [] and s.held == 1 and s.windows_recovered == 1
        held = Summary.from_dict(json.loads(outbox.get_meta("held:clinical:1.0.0") or "{}"))
        assert (held.count, held.windows) == (15, 2)
        out = s.close(window(model, rows, 9, 3))
        assert out is not None and [(g.seq, g.count, g.windows) for g in stored(outbox)] == [(1, 24, 3)]
        assert histograms(stored(outbox)[0]) == histograms(exact(model, rows, [(7, 1), (8, 2), (9, 3)]))
    finally:
        s.stop()


def test_one_held_summary_per_version_and_past_the_bound_the_oldest_version_is_dropped_and_counted(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    s = Summarizer("dev-1", outbox, k=1, max_held_versions=2)
    try:
        with disk_full(outbox):
            for i, version in enumerate(["1.0.0", "1.0.0", "1.0.0", "1.1.0", "1.1.0"]):
                s.close(window(model, rows, 5, i, version))
            assert (s.windows_held_disk_full, s.windows_lost) == (5, 0)  # two versions: within the bound
            s.close(window(model, rows, 4, 5, "1.2.0"))  # a third version: 1.0.0 (held longest) is dropped
            assert (s.windows_held_disk_full, s.windows_lost, s.predictions_lost) == (3, 3, 15)
        assert [r for r in caplog.records if "LOST 3 window(s) of clinical 1.0.0" in r.getMessage()]
        s.close(window(model, rows, 6, 6, "1.2.0"))  # space is back: 1.2.0 written, then the retry writes 1.1.0
        got = stored(outbox)
        assert [(g.seq, g.version, g.count, g.windows) for g in got] == [(1, "1.2.0", 10, 2), (2, "1.1.0", 10, 2)]
        assert (s.windows_held_disk_full, s.windows_recovered, s.windows_lost) == (0, 3, 3)  # 1 of 1.2.0, 2 of 1.1.0
    finally:
        s.stop()


def test_noise_is_drawn_once_on_the_merged_counts_and_epsilon_spent_once(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox) -> None:
    s = Summarizer("dev-1", outbox, k=1, epsilon=0.5, seed=3)
    try:
        with disk_full(outbox):
            s.close(window(model, rows, 30, 1))
            s.close(window(model, rows, 30, 2))
            assert outbox.get_meta("epsilon_spent") is None  # the failed writes spent nothing
        s.close(window(model, rows, 30, 3))
        (got,) = stored(outbox)
        assert (got.count, got.windows, got.epsilon, got.epsilon_spent) == (90, 3, 0.5, 0.5)
        assert outbox.get_meta("epsilon_spent") == "0.5"
        assert histograms(got) != histograms(exact(model, rows, [(30, 1), (30, 2), (30, 3)]))  # noisy
    finally:
        s.stop()


def test_adding_noise_leaves_the_held_exact_counts_alone(model: LoadedModel, rows: np.ndarray) -> None:
    c = window(model, rows, 30, 1)
    s = c.window.to_summary("dev-1", c.model, c.version, 0, c.start, c.end)
    before = histograms(s)
    noisy = add_laplace_noise(s, 0.5, np.random.default_rng(0))
    assert histograms(s) == before and s.epsilon_spent == 0.0
    assert histograms(noisy) != before and noisy.epsilon_spent == 0.5


def test_the_agent_reports_held_windows_and_a_shutdown_on_a_full_disk_counts_them_lost(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    agent = Agent(DeviceConfig(device_id="dev-1", target=TARGET.name, min_window_samples=1, allow_small_windows=True),
                  TARGET, model, sink=outbox, background=False)
    for row in rows[:10]:
        agent.predict(row)
    agent.close_window(wait=True)
    with disk_full(outbox):
        for row in rows[10:16]:
            agent.predict(row)
        agent.close_window(wait=True)
        st = agent.status()
        assert (st["windows_held_disk_full"], st["windows_recovered"], st["windows_lost"]) == (1, 0, 0)
        assert st["summaries_emitted"] == 1 and agent.summarizer.failures == 0
        assert "edgefleet_agent_windows_held_disk_full 1\n" in prometheus_text(agent)  # the device's /metrics
        assert st["outbox"]["disk_full"] >= 1 and st["summarizer_failures"] == 0  # the operator sees why
        for row in rows[16:20]:
            agent.predict(row)
        agent.close()  # the current window joins the held one; the disk is still full: both are lost
    st = agent.status()
    assert (st["windows_held_disk_full"], st["windows_lost"], agent.summarizer.predictions_lost) == (0, 2, 10)
    assert "edgefleet_agent_windows_lost_total 2\n" in prometheus_text(agent)
    assert [r for r in caplog.records if "LOST 2 window(s)" in r.getMessage() and "shutting down" in r.getMessage()]
    assert [(g.seq, g.count) for g in stored(outbox)] == [(1, 10)]


@pytest.mark.parametrize("damage", ["not json", "fails the contract"])
def test_a_held_window_that_cannot_be_read_is_dropped_and_counted_not_every_later_window(
        model: LoadedModel, rows: np.ndarray, outbox: Outbox, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    s = Summarizer("dev-1", outbox, k=20)
    try:
        assert s.close(window(model, rows, 7, 1)) is None  # held below k
        held = json.loads(outbox.get_meta("held:clinical:1.0.0") or "{}")
        held["output"]["class_counts"][0] += 3  # no longer adds up to window.count
        with outbox.transaction() as tx:
            tx.set_meta("held:clinical:1.0.0", "{half" if damage == "not json" else json.dumps(held))
        with caplog.at_level(logging.ERROR, logger="device_agent.summarizer"):
            out = s.close(window(model, rows, 25, 2))
        assert out is not None and [(g.seq, g.count) for g in stored(outbox)] == [(1, 25)]  # this window alone
        assert (s.windows_lost, s.failures) == (1, 1) and "cannot be used" in caplog.text
        assert not outbox.get_meta("held:clinical:1.0.0")  # cleared: later windows are not held back by it
        assert s.close(window(model, rows, 21, 3)) is not None and len(stored(outbox)) == 2
    finally:
        s.stop()
