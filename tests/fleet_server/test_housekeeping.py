"""Bounded storage (fleet_server/housekeeping.py): the quarantine's row cap and payload budget, summary retention,
the settings that set them (flags and server.toml's [storage] table), the service thread and the one-shot CLI.
Real SQLite throughout; quarantine rows and summaries arrive through the real HTTP ingest path where the app
matters. Old summaries are made by moving their ``received`` time back (the one thing a test cannot wait for)."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key
from fleet_server import alerts
from fleet_server.alerts import AlertRules
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ConfigError
from fleet_server.health import DEFAULT_LOOKBACK_S
from fleet_server.housekeeping import (
    HousekeepingService,
    attach_housekeeping,
    fits,
    payloads_to_evict,
    summaries_cutoff,
)
from fleet_server.ingest import QUARANTINE_PAYLOAD_BYTES
from fleet_server.rollouts import service as rollouts
from fleet_server.routes_ingest import attach_ingest
from fleet_server.server import build
from fleet_server.settings import MIN_SUMMARY_RETENTION_DAYS, ServerSettings, storage_table
from fleet_server.store import MIGRATIONS, Store, statements
from tests.fleet_server.conftest import Fleet, FleetFactory, run_cli
from tests.support import wait_until

DAY = 86400.0
App = tuple[TestClient, Fleet, HousekeepingService]


@pytest.fixture
def make_app(make_fleet: FleetFactory, start_app: Any) -> Callable[..., App]:
    """``make_app(housekeeping={...}, **settings)``: the app with ingest and housekeeping attached, its lifespan
    running. Housekeeping's own thread is kept quiet (hour-long interval and checks) unless the test says."""

    def make(housekeeping: dict[str, Any] | None = None, **settings: Any) -> App:
        settings.setdefault("housekeeping_interval_seconds", 3600.0)
        fleet = make_fleet(**settings)

        def attach(app: Any, ctx: Any) -> HousekeepingService:
            attach_ingest(app, ctx, validator_processes=0)
            return attach_housekeeping(app, ctx, **{"check_seconds": 3600.0, **(housekeeping or {})})

        client, svc = start_app(fleet, attach)
        return client, fleet, svc

    return make


def post(client: TestClient, body: bytes) -> Any:
    return client.post("/api/v1/summaries", content=body, headers={"Content-Type": "application/json"})


def quarantine_junk(client: TestClient, n: int, size: int = 0, start: int = 0) -> None:
    """``n`` malformed messages through the real HTTP path: each becomes a quarantine row with its payload."""
    for i in range(start, start + n):
        r = post(client, f"junk {i:04d} ".encode() + b"x" * size)
        assert r.status_code == 422 and r.json()["rejected"][0]["reason"] == "malformed_json", r.text


def metrics(client: TestClient) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
            if line and not line.startswith("#")}


def usage(store: Store) -> tuple[int, int]:
    """(rows, payload bytes) as the triggers keep them, checked against the table itself: one statement, so
    one snapshot (two would race a pass committing between them)."""
    row = store.one("SELECT u.row_count, u.payload_bytes, q.n, q.bytes FROM quarantine_usage AS u, (SELECT COUNT(*)"
                    " AS n, COALESCE(SUM(length(payload)), 0) AS bytes FROM quarantine) AS q")
    assert row is not None and (row[0], row[1]) == (row[2], row[3]), tuple(row or ())
    return int(row[2]), int(row[3])


def transactions(store: Store, action: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``action`` on this thread and return its result and the write transactions its connection began."""
    seen: list[str] = []
    conn = store.conn()
    conn.set_trace_callback(seen.append)
    try:
        out = action()
    finally:
        conn.set_trace_callback(None)
    return out, [s for s in seen if s.startswith("BEGIN IMMEDIATE")]


# ---- the pure core -------------------------------------------------------------------------------------------
def test_payloads_to_evict_frees_at_least_the_excess_from_the_oldest() -> None:
    assert payloads_to_evict([10, 10, 10], 15) == 2
    assert payloads_to_evict([10, 10, 10], 10) == 1
    assert payloads_to_evict([10, 10, 10], 100) == 3  # not enough in this chunk: all of it, the next goes on
    assert payloads_to_evict([], 5) == 0


def test_a_chunk_frees_at_most_its_byte_budget_but_always_makes_progress() -> None:
    assert fits([3, 3, 3], 6) == 2
    assert fits([3, 3, 3], 100) == 3
    assert fits([50, 1], 10) == 1  # one row over the budget still goes


def test_the_cutoff_never_reaches_into_an_alert_window_or_an_active_rollout_stage() -> None:
    now = 1_000 * DAY
    assert summaries_cutoff(now, 0, alert_window_s=DAY, rollout_since=None) is None  # keep forever
    assert summaries_cutoff(now, 400 * DAY, alert_window_s=DAY, rollout_since=None) == now - 400 * DAY
    skew = 300.0  # a window may end up to 5 minutes after it was received
    assert summaries_cutoff(now, 2 * DAY, alert_window_s=30 * DAY, rollout_since=None) == now - 30 * DAY - skew
    assert summaries_cutoff(now, 2 * DAY, alert_window_s=DAY, rollout_since=now - 9 * DAY) == now - 9 * DAY


# ---- quarantine ----------------------------------------------------------------------------------------------
def test_quarantine_over_the_row_cap_is_evicted_oldest_first_down_to_the_cap_in_one_pass(
        make_app: Callable[..., App]) -> None:
    client, fleet, svc = make_app(quarantine_max_rows=10)
    quarantine_junk(client, 30)
    assert usage(fleet.store)[0] == 30

    result = svc.run_once()

    assert result.quarantine_rows_evicted == 20 and result.complete
    kept = [bytes(r["payload"]).split()[1].decode() for r in fleet.quarantined()]
    assert kept == [f"{i:04d}" for i in range(20, 30)]  # the newest ten
    assert usage(fleet.store)[0] == 10
    m = metrics(client)
    assert m['edgefleet_quarantine_evicted_total{part="row"}'] == 20
    assert m["edgefleet_quarantine_rows"] == 10
    # Ingest goes on quarantining afterwards; the next pass evicts down to the cap again.
    quarantine_junk(client, 3, start=30)
    assert svc.run_once().quarantine_rows_evicted == 3
    assert metrics(client)['edgefleet_quarantine_evicted_total{part="row"}'] == 23


def test_eviction_runs_in_chunks_each_its_own_transaction(make_app: Callable[..., App]) -> None:
    client, fleet, svc = make_app(quarantine_max_rows=4, housekeeping_chunk_rows=3, housekeeping={"pause_seconds": 0})
    quarantine_junk(client, 24)

    result, began = transactions(fleet.store, svc.run_once)

    assert result.quarantine_rows_evicted == 20
    assert len(began) == math.ceil(20 / 3) == result.transactions  # 3 + 3 + ... + 2: seven transactions
    assert usage(fleet.store)[0] == 4
    assert metrics(client)["edgefleet_housekeeping_transactions_total"] == 7


def test_past_the_payload_budget_the_oldest_rows_keep_their_metadata_and_lose_their_payload(
        make_app: Callable[..., App]) -> None:
    client, fleet, svc = make_app(quarantine_max_payload_mb=1)
    quarantine_junk(client, 20, size=QUARANTINE_PAYLOAD_BYTES)  # each stored cut at 64 KiB: 1.25 MiB in all
    assert usage(fleet.store) == (20, 20 * QUARANTINE_PAYLOAD_BYTES)

    result = svc.run_once()

    assert result.quarantine_rows_evicted == 0 and result.quarantine_payloads_evicted == 4
    assert usage(fleet.store) == (20, 16 * QUARANTINE_PAYLOAD_BYTES)  # exactly 1 MiB left
    rows = fleet.quarantined()
    assert [r["payload"] is None for r in rows] == [True] * 4 + [False] * 16
    assert all(r["reason"] == "malformed_json" and r["detail"] for r in rows[:4])  # the evidence's metadata stays
    m = metrics(client)
    assert m['edgefleet_quarantine_evicted_total{part="payload"}'] == 4
    assert m["edgefleet_quarantine_evicted_bytes_total"] == 4 * QUARANTINE_PAYLOAD_BYTES
    assert m["edgefleet_quarantine_payload_bytes"] == 16 * QUARANTINE_PAYLOAD_BYTES
    # The next payloads to go are the next oldest (the pass remembers where it stopped).
    quarantine_junk(client, 2, size=QUARANTINE_PAYLOAD_BYTES, start=20)
    assert svc.run_once().quarantine_payloads_evicted == 2
    assert [r["payload"] is None for r in fleet.quarantined()] == [True] * 6 + [False] * 16


def test_the_migration_counts_a_quarantine_that_predates_it(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for i, script in enumerate(MIGRATIONS[:3], start=1):
        for stmt in statements(script):
            raw.execute(stmt)
        raw.execute("INSERT INTO schema_version VALUES (?)", (i,))
    raw.executemany("INSERT INTO quarantine (received, source, reason, detail, payload) VALUES (0, 'http', 'shape',"
                    " '', ?)", [(b"p" * n,) for n in (10, 20, 30)] + [(None,)])
    raw.close()
    store = Store(path)
    try:
        assert usage(store) == (4, 60)
    finally:
        store.close()


# ---- summaries -----------------------------------------------------------------------------------------------
def age(fleet: Fleet, seqs: range, days: float) -> None:
    with fleet.store.write() as c:
        c.execute(f"UPDATE summaries SET received = received - ? WHERE seq BETWEEN {seqs.start} AND {seqs.stop - 1}",
                  (days * DAY,))


def test_summaries_older_than_the_retention_are_pruned_and_recent_ones_kept(make_app: Callable[..., App]) -> None:
    client, fleet, svc = make_app(summary_retention_days=30)
    assert post(client, fleet["dev-1"].message(range(1, 11))).status_code == 200
    age(fleet, range(1, 5), 31)  # received 31 days ago
    age(fleet, range(5, 7), 29)  # 29 days ago: inside the retention

    result = svc.run_once()

    assert result.summaries_pruned == 4
    assert fleet.seqs("dev-1") == list(range(5, 11))
    assert result.summaries_cutoff is not None and time.time() - result.summaries_cutoff == pytest.approx(30 * DAY,
                                                                                                         abs=60)
    assert metrics(client)["edgefleet_summaries_pruned_total"] == 4


def test_pruning_covers_every_model_version_in_chunks(make_fleet: FleetFactory) -> None:
    fleet = make_fleet(summary_retention_days=10, housekeeping_chunk_rows=4)
    old, new = time.time() - 11 * DAY, time.time() - 9 * DAY
    with fleet.store.write() as c:  # versions the skip-scan must find, in and out of index order
        c.executemany("INSERT INTO summaries VALUES (?, ?, ?, ?, '', '', 1, '{}', ?)",
                      [(f"d{i % 3}", i, model, version, old if i % 2 else new)
                       for i, (model, version) in enumerate([("b", "2"), ("a", "1"), ("b", "10"), ("a", "1.1")] * 9)])
    svc = HousekeepingService(fleet.settings, fleet.store, pause_seconds=0)

    result, began = transactions(fleet.store, svc.run_once)

    assert result.summaries_pruned == 18
    assert fleet.store.one("SELECT COUNT(*) FROM summaries WHERE received < ?", (time.time() - 10 * DAY,))[0] == 0
    assert fleet.store.one("SELECT COUNT(*) FROM summaries")[0] == 18
    assert len(began) == result.transactions >= math.ceil(18 / 4)


def test_retention_zero_keeps_every_summary(make_app: Callable[..., App]) -> None:
    client, fleet, svc = make_app(summary_retention_days=0)
    assert post(client, fleet["dev-1"].message(range(1, 6))).status_code == 200
    age(fleet, range(1, 6), 10 * 365)

    result = svc.run_once()

    assert result.summaries_pruned == 0 and result.summaries_cutoff is None
    assert fleet.seqs("dev-1") == [1, 2, 3, 4, 5]


def test_pruning_keeps_what_an_active_rollout_stage_and_a_long_alert_window_still_read(
        make_fleet: FleetFactory) -> None:
    fleet = make_fleet(summary_retention_days=30)
    now = time.time()
    with fleet.store.write() as c:
        c.executemany("INSERT INTO summaries VALUES ('dev-1', ?, 'clinical', '1.0.0', '', '', 1, '{}', ?)",
                      [(1, now - 100 * DAY), (2, now - 50 * DAY), (3, now - 40 * DAY), (4, now - DAY)])
    rid = rollouts.start(fleet.store, model="clinical", version="1.0.0", cohort={}, stages=[100], bake_seconds=60,
                         now=now - 45 * DAY)  # its stage began 45 days ago: its gates read seq 3 and 4
    alerts.set_rules(fleet.store, "clinical", {"window_s": 60 * DAY})  # alerts read seq 2, 3, 4
    svc = HousekeepingService(fleet.settings, fleet.store, clock=lambda: now)

    assert svc.run_once().summaries_pruned == 1
    assert fleet.seqs("dev-1") == [2, 3, 4]
    alerts.set_rules(fleet.store, "clinical", {})  # back to the default one-day window: the rollout still holds 3
    assert svc.run_once().summaries_pruned == 1
    assert fleet.seqs("dev-1") == [3, 4]
    rollouts.set_state(fleet.store, rollouts.DesiredSigner(generate_key(), "http://127.0.0.1:9"), rid, "abort", "t")
    assert svc.run_once().summaries_pruned == 1
    assert fleet.seqs("dev-1") == [4]


def test_a_pass_judges_retention_by_the_injected_clock_alone(make_fleet: FleetFactory) -> None:
    """The clock is the one way to tell the service the time: a pass prunes by it (here, as if run 20 days from
    now), and ``run_once`` takes no time of its own that could disagree with the thread's passes."""
    fleet = make_fleet(summary_retention_days=30)
    now = time.time()
    with fleet.store.write() as c:
        c.executemany("INSERT INTO summaries VALUES ('dev-1', ?, 'clinical', '1.0.0', '', '', 1, '{}', ?)",
                      [(1, now - 40 * DAY), (2, now - 20 * DAY), (3, now - DAY)])
    today = HousekeepingService(fleet.settings, fleet.store)  # the default clock: the wall clock
    later = HousekeepingService(fleet.settings, fleet.store, clock=lambda: now + 20 * DAY)

    assert today.run_once().summaries_pruned == 1
    assert fleet.seqs("dev-1") == [2, 3]
    result = later.run_once()
    assert result.summaries_pruned == 1 and fleet.seqs("dev-1") == [3]  # 40 days old by the injected clock
    assert result.summaries_cutoff == pytest.approx(now + 20 * DAY - 30 * DAY)
    with pytest.raises(TypeError):
        later.run_once(now=now)  # type: ignore[call-arg]


# ---- settings ------------------------------------------------------------------------------------------------
BAD_SETTINGS = [
    ("quarantine_max_rows", 0), ("quarantine_max_rows", -5), ("quarantine_max_rows", 2.5),
    ("quarantine_max_rows", "100"), ("quarantine_max_rows", True), ("quarantine_max_payload_mb", -1),
    ("quarantine_max_payload_mb", 10**8), ("summary_retention_days", -1.0), ("summary_retention_days", math.nan),
    ("summary_retention_days", math.inf), ("summary_retention_days", "400"), ("housekeeping_interval_seconds", 0),
    ("housekeeping_interval_seconds", -1), ("housekeeping_interval_seconds", math.nan),
    ("housekeeping_chunk_rows", 0), ("housekeeping_chunk_rows", 10_001),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v in BAD_SETTINGS])
def test_a_bad_storage_setting_is_a_config_error_naming_it_and_its_flag(tmp_path: Path, name: str,
                                                                          value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        ServerSettings(data_dir=tmp_path, **{name: value})
    assert name in str(err.value) and "--" + name.replace("_", "-") in str(err.value)


def test_the_defaults_are_bounded_and_zero_means_no_payloads_or_keep_forever(tmp_path: Path) -> None:
    s = ServerSettings(data_dir=tmp_path)
    assert (s.quarantine_max_rows, s.quarantine_max_payload_bytes, s.summary_retention_days) == (
        100_000, 256 * 1024 * 1024, 400.0)
    ServerSettings(data_dir=tmp_path, quarantine_max_payload_mb=0, summary_retention_days=0)  # both allowed


def test_a_retention_shorter_than_the_windows_drift_and_alerts_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"summary_retention_days .*at least 1 day"):
        ServerSettings(data_dir=tmp_path, summary_retention_days=0.5)
    ServerSettings(data_dir=tmp_path, summary_retention_days=MIN_SUMMARY_RETENTION_DAYS)
    # The floor covers the longest window the server reads by default; lengthening one must raise the floor.
    assert max(AlertRules().window_s, DEFAULT_LOOKBACK_S) <= MIN_SUMMARY_RETENTION_DAYS * DAY
    # Every default is above the floor, and 400 days covers the longest stage bake the rollout API accepts.
    assert ServerSettings(data_dir=tmp_path).summary_retention_days * DAY > 365 * DAY


# ---- the service ---------------------------------------------------------------------------------------------
def test_the_thread_survives_a_failing_pass_and_stops_on_shutdown(make_app: Callable[..., App]) -> None:
    client, fleet, svc = make_app(quarantine_max_rows=5, housekeeping={"check_seconds": 0.05})
    # A real failure: a trigger refusing every delete from the quarantine (as an operator's evidence hold might).
    with fleet.store.write() as c:
        c.execute("CREATE TRIGGER hold BEFORE DELETE ON quarantine BEGIN SELECT RAISE(ABORT, 'evidence hold'); END")
    quarantine_junk(client, 8)
    assert wait_until(lambda: metrics(client)["edgefleet_housekeeping_failures_total"] >= 2, 30)
    assert svc.running and usage(fleet.store)[0] == 8

    with fleet.store.write() as c:
        c.execute("DROP TRIGGER hold")
    assert wait_until(lambda: usage(fleet.store)[0] == 5, 30)  # the same thread, next check
    assert svc.running
    assert metrics(client)['edgefleet_quarantine_evicted_total{part="row"}'] == 3

    client.__exit__(None, None, None)  # the app's shutdown
    assert not svc.running


def test_ingest_goes_on_while_a_pass_is_under_way_and_shutdown_interrupts_the_pass(
        make_app: Callable[..., App]) -> None:
    """The pass pauses (an hour, here) between its chunks: HTTP ingest commits meanwhile, quarantine inserts
    too, and the app's shutdown ends the pass at once."""
    client, fleet, svc = make_app(quarantine_max_rows=4, housekeeping_chunk_rows=2,
                                  housekeeping={"pause_seconds": 3600.0})
    quarantine_junk(client, 10)
    mid_pass = threading.Thread(target=svc.run_once, daemon=True)
    mid_pass.start()
    assert wait_until(lambda: usage(fleet.store)[0] == 8, 30)  # its first chunk committed; it now pauses

    assert post(client, fleet["dev-1"].message(range(1, 21))).json()["accepted"] == 20
    assert post(client, fleet["dev-2"].message(range(1, 6))).json()["accepted"] == 5
    quarantine_junk(client, 1, start=10)
    assert fleet.stored() == 25 and usage(fleet.store)[0] == 9
    assert mid_pass.is_alive()  # still the same pass

    assert svc.stop(timeout=30)
    mid_pass.join(30)
    assert not mid_pass.is_alive()
    assert usage(fleet.store)[0] == 9  # interrupted, not finished


def test_the_server_runs_housekeeping_with_its_lifespan(built: Any, tmp_path: Path) -> None:
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    app, ctx = build(ServerSettings(data_dir=data, broker="none", quarantine_max_rows=3))
    svc = ctx.extensions["housekeeping"]
    with ctx.store.write() as c:  # left by an earlier run: more than the cap
        c.executemany("INSERT INTO quarantine (received, source, reason, detail, payload) VALUES (0, 'http', "
                      "'shape', '', x'00')", [()] * 7)
    with TestClient(app) as client:
        assert svc.running
        assert wait_until(lambda: metrics(client)["edgefleet_quarantine_rows"] == 3, 30)  # the start-up pass
        assert metrics(client)["edgefleet_housekeeping_passes_total"] >= 1
    assert not svc.running
    ctx.store.close()


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.fixture
def data_folder(built: Any, tmp_path: Path) -> Path:
    data = tmp_path / "server"
    assert run_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")])[0] == 0
    return data


def test_the_housekeeping_command_runs_one_pass_with_the_given_bounds(data_folder: Path) -> None:
    store = Store(data_folder / "fleet.sqlite")
    with store.write() as c:
        c.executemany("INSERT INTO quarantine (received, source, reason, detail, payload) VALUES (0, 'http', "
                      "'shape', '', x'00')", [()] * 12)
    store.close()

    rc, out, err = run_cli(["housekeeping", "--data", str(data_folder), "--quarantine-max-rows", "5"])

    assert rc == 0, err
    assert "evicted 7 quarantine rows" in out
    store = Store(data_folder / "fleet.sqlite")
    assert usage(store)[0] == 5
    store.close()
    rc, _, err = run_cli(["housekeeping", "--data", str(data_folder), "--summary-retention-days", "0.25"])
    assert rc == 1 and "--summary-retention-days" in err


def test_serve_passes_its_storage_flags_to_the_server(data_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` itself would run until stopped: the server's entry point is replaced to capture its settings."""
    seen: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: seen.append(s) or 0)
    rc, _, err = run_cli(["serve", "--data", str(data_folder), "--broker", "none", "--quarantine-max-rows", "7",
                          "--quarantine-max-payload-mb", "3", "--summary-retention-days", "90",
                          "--housekeeping-interval-seconds", "5", "--housekeeping-chunk-rows", "50"])
    assert rc == 0, err
    s = seen[0]
    assert (s.quarantine_max_rows, s.quarantine_max_payload_mb, s.summary_retention_days,
            s.housekeeping_interval_seconds, s.housekeeping_chunk_rows) == (7, 3, 90.0, 5.0, 50)
    rc, _, err = run_cli(["serve", "--data", str(data_folder), "--quarantine-max-rows", "0"])
    assert rc == 1 and "--quarantine-max-rows" in err and len(seen) == 1


# ---- server.toml's [storage] table ---------------------------------------------------------------------------
def add_storage(data: Path, table: str) -> Path:
    """Append a ``[storage]`` table to the data folder's server.toml, as the README says; returns the file."""
    conf = data / "server.toml"
    conf.write_text(conf.read_text() + "\n[storage]\n" + table)
    return conf


def fill(data: Path, quarantine_rows: int, summary_ages_days: list[float]) -> None:
    now = time.time()
    store = Store(data / "fleet.sqlite")
    with store.write() as c:
        c.executemany("INSERT INTO quarantine (received, source, reason, detail, payload) VALUES (0, 'http', "
                      "'shape', '', x'00')", [()] * quarantine_rows)
        c.executemany("INSERT INTO summaries VALUES ('dev-1', ?, 'clinical', '1.0.0', '', '', 1, '{}', ?)",
                      [(seq, now - days * DAY) for seq, days in enumerate(summary_ages_days, 1)])
    store.close()


def counts(data: Path) -> tuple[int, int]:
    """(quarantine rows, summaries) in the data folder's database."""
    store = Store(data / "fleet.sqlite")
    try:
        return usage(store)[0], int(store.one("SELECT COUNT(*) FROM summaries")[0])
    finally:
        store.close()


def serve_settings(monkeypatch: pytest.MonkeyPatch, data: Path, *flags: str) -> tuple[int, ServerSettings | None, str]:
    """Run ``serve`` with the server's entry point replaced (it would run until stopped): its status, the settings
    it would have served with (None when it refused to start) and its standard error."""
    seen: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: seen.append(s) or 0)
    rc, _, err = run_cli(["serve", "--data", str(data), "--broker", "none", *flags])
    return rc, (seen[0] if seen else None), err


def test_the_housekeeping_command_enforces_the_bounds_in_server_toml_without_flags(data_folder: Path) -> None:
    """The review's case: the server keeps summaries forever by its server.toml, and a cron job runs
    `housekeeping --data srv` with no flags. Nothing the server keeps is deleted; the file's cap holds."""
    add_storage(data_folder, "summary_retention_days = 0\nquarantine_max_rows = 5\n")
    fill(data_folder, quarantine_rows=12, summary_ages_days=[500, 450, 1])

    rc, out, err = run_cli(["housekeeping", "--data", str(data_folder)])

    assert rc == 0, err
    assert "evicted 7 quarantine rows" in out and "pruned 0 summaries (kept forever)" in out
    assert counts(data_folder) == (5, 3)


def test_serve_runs_with_the_bounds_in_server_toml(data_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_storage(data_folder, "quarantine_max_rows = 7\nquarantine_max_payload_mb = 3\nsummary_retention_days = 0\n"
                             "housekeeping_interval_seconds = 5\nhousekeeping_chunk_rows = 50\n")

    rc, s, err = serve_settings(monkeypatch, data_folder)

    assert rc == 0 and s is not None, err
    assert (s.quarantine_max_rows, s.quarantine_max_payload_mb, s.summary_retention_days,
            s.housekeeping_interval_seconds, s.housekeeping_chunk_rows) == (7, 3, 0.0, 5.0, 50)
    assert isinstance(s.summary_retention_days, float)  # TOML's 0 is an integer; the setting is a float, as the flag's


def test_a_flag_overrides_server_toml_for_that_run_and_the_rest_of_the_file_still_holds(
        data_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = add_storage(data_folder, "quarantine_max_rows = 50\nsummary_retention_days = 0\n")
    fill(data_folder, quarantine_rows=12, summary_ages_days=[500])

    rc, out, err = run_cli(["housekeeping", "--data", str(data_folder), "--quarantine-max-rows", "5"])

    assert rc == 0, err
    assert "evicted 7 quarantine rows" in out  # the flag's 5, not the file's 50
    assert counts(data_folder) == (5, 1)  # the file's retention (forever), not the default 400 days
    rc, s, err = serve_settings(monkeypatch, data_folder, "--summary-retention-days", "30")
    assert rc == 0 and s is not None, err
    assert (s.quarantine_max_rows, s.summary_retention_days) == (50, 30.0)
    assert "summary_retention_days = 0" in conf.read_text()  # a flag never writes the file


def test_the_housekeeping_command_prints_each_bound_and_where_it_came_from(data_folder: Path) -> None:
    conf = add_storage(data_folder, "summary_retention_days = 0\nquarantine_max_payload_mb = 64\n")

    rc, out, err = run_cli(["housekeeping", "--data", str(data_folder), "--quarantine-max-payload-mb", "8"])

    assert rc == 0, err
    assert out.splitlines()[:5] == [
        "housekeeping bounds:",
        "  quarantine_max_rows = 100000 (default)",
        "  quarantine_max_payload_mb = 8 (flag --quarantine-max-payload-mb)",
        f"  summary_retention_days = 0 (file {conf})",
        "  housekeeping_chunk_rows = 500 (default)",
    ]
    assert out.splitlines()[5].startswith("housekeeping: evicted 0 quarantine rows")


def commands(data: Path) -> list[list[str]]:
    """Commands that read server.toml: the two that run housekeeping and two that do not."""
    return [[*c, "--data", str(data)] for c in (["housekeeping"], ["serve", "--broker", "none"], ["tokens", "list"],
                                                 ["backup", "--to", str(data.parent / "copy")])]


BAD_TABLES = [  # a line of [storage], the key the error must name, the rule it must state
    ("summary_retention_days = 0.5", "summary_retention_days", "0 (keep forever) or at least 1 day"),
    ('summary_retention_days = "0"', "summary_retention_days", "a finite number, 0 or more, not '0' (a string"),
    ("summary_retention_days = -1", "summary_retention_days", "a finite number, 0 or more, not -1"),
    ("quarantine_max_rows = 0", "quarantine_max_rows", "a whole number from 1 to 1,000,000,000, not 0"),
    ("quarantine_max_rows = 1e5", "quarantine_max_rows", "a whole number from 1 to 1,000,000,000, not 100000.0"),
    ("quarantine_max_payload_mb = true", "quarantine_max_payload_mb", "a whole number from 0 to"),
    ("housekeeping_interval_seconds = nan", "housekeeping_interval_seconds", "a finite number, 0 or more"),
    ("housekeeping_interval_seconds = 0", "housekeeping_interval_seconds", "more than 0 and at most 86400"),
    ("housekeeping_chunk_rows = [500]", "housekeeping_chunk_rows", "a whole number from 1 to 10,000"),
]


@pytest.mark.parametrize(("line", "key", "rule"), BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_a_bad_value_in_server_toml_stops_every_command_naming_the_file_the_key_and_the_rule(
        data_folder: Path, monkeypatch: pytest.MonkeyPatch, line: str, key: str, rule: str) -> None:
    conf = add_storage(data_folder, line + "\n")
    fill(data_folder, quarantine_rows=3, summary_ages_days=[500])
    served: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: served.append(s) or 0)

    for command in commands(data_folder):
        rc, out, err = run_cli(command)
        assert rc == 1 and f"{conf}: [storage] {key} must be {rule}" in err, (command, err)
        assert out == ""  # refused before anything ran
    assert not served and counts(data_folder) == (3, 1)


def test_an_unknown_key_in_the_storage_table_is_refused_naming_it(data_folder: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo must not fall back to the default silently (here: summaries pruned after 400 days)."""
    conf = add_storage(data_folder, "summary_retention_day = 0\nquarantine_rows = 5\n")
    monkeypatch.setattr("fleet_server.server.serve", lambda s: 0)

    for command in commands(data_folder):
        rc, out, err = run_cli(command)
        assert rc == 1 and out == "", (command, err)
        assert (f"{conf}: unknown keys in [storage]: summary_retention_day (did you mean summary_retention_days?), "
                "quarantine_rows (did you mean quarantine_max_rows?); the keys are quarantine_max_rows,") in err


def test_a_storage_key_outside_the_storage_table_is_refused_not_ignored(data_folder: Path) -> None:
    conf = data_folder / "server.toml"
    conf.write_text(conf.read_text() + "summary_retention_days = 0\n")  # no [storage] line above it

    rc, out, err = run_cli(["housekeeping", "--data", str(data_folder)])

    assert rc == 1 and out == "" and f"{conf}: summary_retention_days must be in the [storage] table" in err


def test_a_server_toml_that_is_not_toml_is_a_config_error_naming_it(data_folder: Path) -> None:
    add_storage(data_folder, "summary_retention_days = \n")

    rc, out, err = run_cli(["housekeeping", "--data", str(data_folder)])

    assert rc == 1 and out == "" and f"fleet-server: error: {data_folder / 'server.toml'} is not valid TOML" in err


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v in BAD_SETTINGS])
def test_server_toml_and_the_flags_refuse_the_same_values(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        storage_table({name: value}, "srv/server.toml")
    assert str(err.value).startswith(f"srv/server.toml: [storage] {name} must be ")
    assert storage_table({name: 1}, "srv/server.toml") == {name: 1}  # and accept the same
