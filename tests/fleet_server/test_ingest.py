"""Ingest over HTTP and the shared validation path and writer: real SQLite, real signatures, real package.

Every rejection is checked three ways (its reason in the answer, a quarantine row, a counter) and followed by
a good message that must still be stored."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet_contracts.canonical import canonical_bytes
from edgefleet_contracts.report import Report
from edgefleet_contracts.signing import envelope_json, generate_key, sign_envelope
from edgefleet_contracts.timeutil import fmt
from fleet_server.app import create_app
from fleet_server.auth import create_token
from fleet_server.errors import RejectedError
from fleet_server.ingest import IngestService, Outcome, Submission, Validator
from fleet_server.routes_ingest import attach_ingest
from tests.fleet_server.conftest import Fleet, FleetFactory, make_summary
from tests.support import wait_until

Http = tuple[TestClient, Fleet, IngestService]


def post(client: TestClient, body: bytes | Any) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/api/v1/summaries", content=data, headers={"Content-Type": "application/json"})


def metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


# ---- valid summaries ------------------------------------------------------------------------------------
def test_http_summaries_are_stored_exactly_once_and_a_replay_is_acknowledged_and_ignored(http: Http) -> None:
    client, fleet, _ = http
    dev = fleet["dev-1"]
    r = post(client, dev.message(range(1, 11)))
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 10, "duplicates": 0, "rejected": []}
    assert fleet.seqs("dev-1") == list(range(1, 11))

    replay = post(client, dev.message(range(5, 13)))  # 5..10 again, 11 and 12 new
    assert replay.status_code == 200
    assert replay.json() == {"accepted": 2, "duplicates": 6, "rejected": []}
    assert fleet.seqs("dev-1") == list(range(1, 13))
    assert fleet.quarantined() == []
    assert metric(client, "edgefleet_ingest_stored_total") == 12
    assert metric(client, "edgefleet_ingest_duplicates_total") == 6
    assert metric(client, 'edgefleet_ingest_received_total{kind="summary"}') == 18
    assert metric(client, "edgefleet_ingest_queue_depth") == 0


def test_a_single_envelope_body_is_accepted_and_stored_as_the_signed_document(http: Http) -> None:
    client, fleet, _ = http
    env = fleet["dev-2"].envelope(7)
    assert post(client, env).json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    row = fleet.store.one("SELECT * FROM summaries WHERE device_id = 'dev-2'")
    assert row is not None and row["seq"] == 7 and (row["model"], row["version"]) == ("clinical", "1.0.0")
    assert json.loads(row["body"]) == env["signed"]
    assert row["window_start"] == env["signed"]["window"]["start"] and row["window_start"].endswith("Z")
    device = fleet.store.one("SELECT last_seen FROM devices WHERE device_id = 'dev-2'")
    assert device is not None and device["last_seen"] is not None


# ---- every rejection: reason, quarantine, counter, and the next good message still lands ----------------
def _forged(f: Fleet) -> bytes:
    return f["dev-1"].message([1], signer=generate_key())


def _tampered(f: Fleet) -> bytes:
    env = f["dev-1"].envelope(1)
    env["signed"]["features"][0]["sum"] += 1.0  # any change the schema allows: only the signature tells
    return json.dumps([env]).encode()


def _unsigned(f: Fleet) -> bytes:
    env = f["dev-1"].envelope(1)
    env["signatures"] = []
    return json.dumps(env).encode()


def _wrong_types(f: Fleet) -> bytes:
    env = f["dev-1"].envelope(1)
    env["signed"]["seq"] = "one"
    return json.dumps([sign_envelope(env["signed"], f["dev-1"].key)]).encode()


def _future(f: Fleet) -> bytes:
    return f["dev-1"].message([1], start=datetime.now(UTC) + timedelta(minutes=10))


def _other_spec(f: Fleet) -> bytes:
    env = f["dev-1"].envelope(1)
    env["signed"]["spec"] = 99
    return json.dumps([sign_envelope(env["signed"], f["dev-1"].key)]).encode()


def _inconsistent(f: Fleet) -> bytes:
    """Signed by the device's own key, well typed, but its class counts add up to more than window.count."""
    env = f["dev-1"].envelope(1)
    env["signed"]["output"]["class_counts"][0] += 5
    return b"[" + envelope_json(sign_envelope(env["signed"], f["dev-1"].key)) + b"]"


BAD: dict[str, tuple[Callable[[Fleet], bytes], str, int]] = {
    # case: (body, reason, HTTP status)
    "forged_by_another_key": (_forged, "bad_signature", 422),
    "altered_after_signing": (_tampered, "bad_signature", 422),
    "unsigned": (_unsigned, "bad_signature", 422),
    "malformed_json": (lambda f: b'[{"signed": {', "malformed_json", 422),
    "not_utf8": (lambda f: b'["\xff\xfe"]', "malformed_json", 422),
    "deep_nesting": (lambda f: b"[" * 10_000 + b"]" * 10_000, "malformed_json", 422),
    "nan": (lambda f: f["dev-1"].message([1]).replace(b'"sum":10.0', b'"sum":NaN', 1), "malformed_json", 422),
    "wrong_types": (_wrong_types, "schema", 422),
    "unsupported_spec": (_other_spec, "schema", 422),
    "inconsistent_counts": (_inconsistent, "schema", 422),
    "not_an_envelope": (lambda f: b'{"device_id": "dev-1", "seq": 1}', "shape", 422),
    "empty_list": (lambda f: b"[]", "shape", 422),
    "over_500_envelopes": (lambda f: json.dumps([{}] * 501).encode(), "shape", 422),
    "unknown_device": (lambda f: f["dev-1"].message([1]).replace(b'"dev-1"', b'"dev-9"'), "unknown_device", 422),
    "future_timestamp": (_future, "future_timestamp", 422),
    "unknown_model_version": (lambda f: f["dev-1"].message([1], version="9.9.9"), "unknown_model_version", 422),
    "oversized_10_MB": (lambda f: b'["' + b"x" * (10 * 1024 * 1024) + b'"]', "too_large", 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_message_is_rejected_quarantined_and_counted_and_ingest_goes_on(http: Http, case: str) -> None:
    client, fleet, _ = http
    make_body, reason, status = BAD[case]
    body = make_body(fleet)
    r = post(client, body)
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["accepted"] == 0 and doc["duplicates"] == 0
    assert [x["reason"] for x in doc["rejected"]] == [reason]
    assert doc["rejected"][0]["detail"]
    if case == "oversized_10_MB":  # the body is read only just past the limit: no false exact size
        assert doc["rejected"][0]["detail"].startswith("message is at least ")
    if case == "inconsistent_counts":  # the fast path leaves it to the full path, which names the rule
        assert "summary.output.class_counts add up to" in doc["rejected"][0]["detail"]

    rows = fleet.quarantined()
    assert [(q["reason"], q["source"]) for q in rows] == [(reason, "http")]
    kept = bytes(rows[0]["payload"])
    if doc["rejected"][0]["index"] is None:  # the whole message was refused: its first 64 KB are kept
        assert kept == body[:64 * 1024]
    else:  # one envelope was refused: that envelope is kept
        sent = json.loads(body)
        assert json.loads(kept) == (sent[0] if isinstance(sent, list) else sent)
    assert metric(client, f'edgefleet_ingest_rejected_total{{reason="{reason}"}}') == 1
    assert fleet.stored() == 0

    good = post(client, fleet["dev-1"].message([2]))
    assert good.status_code == 200 and good.json()["accepted"] == 1
    assert fleet.seqs("dev-1") == [2]


@pytest.mark.parametrize("json_lib", ["orjson", "std-lib json"])
def test_both_json_paths_refuse_the_same_malformed_messages(fleet: Fleet, json_lib: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet_server.ingest.parsing as ingest_module

    if json_lib == "std-lib json":
        monkeypatch.setattr(ingest_module, "_orjson", None)
    else:
        assert ingest_module._orjson is not None, "orjson is a declared server dependency (pyproject server extra)"
    v = Validator(fleet.settings, fleet.store)
    for case in ("malformed_json", "not_utf8", "deep_nesting", "nan"):
        with pytest.raises(RejectedError) as err:
            v.validate(BAD[case][0](fleet), topic_device=None, source="http")
        assert err.value.reason == "malformed_json", case
    ok = v.validate(fleet["dev-1"].message([1, 2]), topic_device=None, source="http")
    assert [a.seq for a in ok.accepted] == [1, 2] and ok.rejected == []


def test_a_float_that_orjson_writes_differently_still_verifies_and_is_stored_canonically(fleet: Fleet) -> None:
    dev = fleet["dev-1"]
    doc = make_summary(1, "dev-1").to_dict()
    doc["features"][0]["sum"] = 1e-07  # canonical JSON "1e-07", orjson "1e-7"
    env = sign_envelope(doc, dev.key)
    checked = Validator(fleet.settings, fleet.store).validate(json.dumps([env]).encode(), topic_device=None,
                                                              source="http")
    assert checked.rejected == [] and len(checked.accepted) == 1
    assert checked.accepted[0].body.encode() == canonical_bytes(doc)


def test_a_message_stores_its_good_envelopes_and_quarantines_each_bad_one(http: Http) -> None:
    client, fleet, _ = http
    dev = fleet["dev-1"]
    envs = [dev.envelope(1), dev.envelope(2, signer=generate_key()), dev.envelope(3), {"not": "an envelope"},
            dev.envelope(4, version="0.0.1"), dev.envelope(5)]
    r = post(client, envs)
    assert r.status_code == 200
    doc = r.json()
    assert (doc["accepted"], doc["duplicates"]) == (3, 0)
    assert [(x["index"], x["reason"]) for x in doc["rejected"]] == [
        (1, "bad_signature"), (3, "shape"), (4, "unknown_model_version")]
    assert fleet.seqs("dev-1") == [1, 3, 5]
    assert sorted(q["reason"] for q in fleet.quarantined()) == ["bad_signature", "shape", "unknown_model_version"]
    assert {q["device_id"] for q in fleet.quarantined("bad_signature")} == {"dev-1"}


def test_a_summary_is_only_accepted_from_the_device_it_names(http: Http) -> None:
    client, fleet, _ = http
    # dev-2 signs a summary that claims to be dev-1's: dev-1's key did not sign it.
    r = post(client, [sign_envelope(make_summary(1, "dev-1").to_dict(), fleet["dev-2"].key)])
    assert r.status_code == 422 and r.json()["rejected"][0]["reason"] == "bad_signature"
    assert fleet.stored() == 0


def test_a_re_enrolled_device_is_verified_with_its_new_key_at_once(http: Http) -> None:
    from edgefleet_contracts.signing import public_b64
    from fleet_server.devices import enroll

    client, fleet, _ = http
    dev = fleet["dev-1"]
    assert post(client, dev.message([1])).status_code == 200  # the old key is now cached
    new_key = generate_key()
    enroll(fleet.store, fleet.settings.fleet, "dev-1", public_b64(new_key.public_key()), replace=True)
    assert post(client, dev.message([2], signer=new_key)).json()["accepted"] == 1
    assert post(client, dev.message([3])).json()["rejected"][0]["reason"] == "bad_signature"


# ---- rate limiting --------------------------------------------------------------------------------------
def test_the_rate_limit_hits_only_the_flooding_device(make_fleet: FleetFactory) -> None:
    fleet = make_fleet(device_rate_per_minute=60)
    frozen = [1000.0]
    svc = IngestService(fleet.settings, fleet.store, monotonic=lambda: frozen[0])
    svc.start()
    try:
        flood, calm = fleet["dev-1"], fleet["dev-2"]
        # Forged summaries in dev-2's name must not use up dev-2's tokens.
        forged = svc.ingest(calm.message(range(1000, 1100), signer=generate_key()))
        assert {r.reason for r in forged.rejected} == {"bad_signature"}
        outcomes = []
        for i in range(5):  # 250 summaries from dev-1, 10 from dev-2 in between
            outcomes.append(svc.ingest(flood.message(range(i * 50, (i + 1) * 50))))
            outcomes.append(svc.ingest(calm.message(range(i * 2, i * 2 + 2))))
        assert fleet.seqs("dev-2") == list(range(10))
        assert fleet.seqs("dev-1") == list(range(60))  # the bucket holds one minute's worth
        limited = fleet.quarantined("rate_limited")
        assert len(limited) == 190 and {q["device_id"] for q in limited} == {"dev-1"}
        assert sum(len(o.rejected) for o in outcomes) == 190

        # Replays of stored summaries are duplicates, not rate limited, even with an empty bucket.
        replay = svc.ingest(flood.message(range(0, 50)))
        assert (replay.accepted, replay.duplicates, replay.rejected) == (0, 50, [])

        frozen[0] += 30  # half a minute refills 30 tokens
        later = svc.ingest(flood.message(range(60, 100)))
        assert later.accepted == 30 and [r.reason for r in later.rejected] == ["rate_limited"] * 10
    finally:
        assert svc.stop(10)


# ---- reports and heartbeats -----------------------------------------------------------------------------
def _report(device_id: str, at: datetime, version: str = "1.0.0") -> dict[str, Any]:
    return Report(device_id, fmt(at), {"name": "clinical", "version": version}, None, "idle", None).to_dict()


def test_reports_keep_the_newest_per_device_and_heartbeats_only_move_last_seen(fleet: Fleet) -> None:
    svc = IngestService(fleet.settings, fleet.store)
    svc.start()
    try:
        dev = fleet["dev-1"]
        now = datetime.now(UTC).replace(microsecond=0)
        newer = json.dumps(sign_envelope(_report("dev-1", now, "1.0.0"), dev.key)).encode()
        older = json.dumps(sign_envelope(_report("dev-1", now - timedelta(hours=1), "0.9.0"), dev.key)).encode()
        forged = json.dumps(sign_envelope(_report("dev-1", now, "6.6.6"), generate_key())).encode()
        assert svc.ingest(newer, kind="report", source="mqtt", topic_device="dev-1").accepted == 1
        assert svc.ingest(older, kind="report", source="mqtt", topic_device="dev-1").duplicates == 1
        bad = svc.ingest(forged, kind="report", source="mqtt", topic_device="dev-1")
        assert [r.reason for r in bad.rejected] == ["bad_signature"]
        wrong_topic = svc.ingest(newer, kind="report", source="mqtt", topic_device="dev-2")
        assert [r.reason for r in wrong_topic.rejected] == ["topic_mismatch"]
        row = fleet.store.one("SELECT reported, last_seen FROM devices WHERE device_id = 'dev-1'")
        assert row is not None and json.loads(row["reported"])["active"]["version"] == "1.0.0"

        beat = json.dumps({"device_id": "dev-2", "at": fmt(now), "outbox_depth": 3}).encode()
        assert svc.ingest(beat, kind="heartbeat", source="mqtt", topic_device="dev-2").ok
        row2 = fleet.store.one("SELECT reported, last_seen FROM devices WHERE device_id = 'dev-2'")
        assert row2 is not None and row2["last_seen"] is not None and row2["reported"] is None
        spoof = svc.ingest(beat, kind="heartbeat", source="mqtt", topic_device="dev-1")
        assert [r.reason for r in spoof.rejected] == ["topic_mismatch"]
    finally:
        assert svc.stop(10)


# ---- the writer -----------------------------------------------------------------------------------------
def test_the_completion_callback_runs_only_after_the_rows_are_committed(fleet: Fleet) -> None:
    svc = IngestService(fleet.settings, fleet.store)
    svc.start()
    seen_at_callback: list[int] = []
    done = threading.Event()

    def check(outcome: Outcome) -> None:  # another connection sees only committed rows
        other = sqlite3.connect(fleet.settings.db_path)
        seen_at_callback.append(other.execute("SELECT COUNT(*) FROM summaries").fetchone()[0])
        other.close()
        done.set()

    blocker = sqlite3.connect(fleet.settings.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer cannot commit while this holds the lock
        svc.submit("summary", fleet["dev-1"].message(range(20)), topic_device=None, source="http", done=check)
        assert not done.wait(0.5), "the callback ran before the transaction could commit"
        blocker.execute("ROLLBACK")
        assert done.wait(10)
        assert seen_at_callback == [20]
    finally:
        blocker.close()
        assert svc.stop(10)


def test_rows_are_committed_in_transactions_of_at_most_ingest_batch_rows(make_fleet: FleetFactory) -> None:
    fleet = make_fleet(ingest_batch=50)
    svc = IngestService(fleet.settings, fleet.store)
    svc.start()
    blocker = sqlite3.connect(fleet.settings.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # queue up 21 messages of 10 while the writer waits for the lock
        for i in range(21):
            svc.submit("summary", fleet["dev-1"].message(range(i * 10, i * 10 + 10)), topic_device=None,
                       source="http")
        # every message validated and waiting for the writer (which holds the first one)
        assert wait_until(lambda: svc.queue_depth() == svc.writer.pending == 21, 10)
        blocker.execute("ROLLBACK")
        assert svc.flush(10)
    finally:
        blocker.close()
        assert svc.stop(10)
    assert fleet.stored() == 210
    # 1 transaction with the first message, then 200 rows in transactions of 50.
    assert svc.counters.snapshot()["batches"] == 5


def test_a_failed_commit_is_reported_and_nothing_is_acknowledged(http: Http) -> None:
    client, fleet, svc = http
    with fleet.store.write() as c:  # every insert fails, as on a full disk
        c.execute("CREATE TRIGGER broken BEFORE INSERT ON summaries BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    svc.writer.retries = 0
    r = post(client, fleet["dev-1"].message([1, 2]))
    assert r.status_code == 503 and r.json()["error"] == "unavailable" and "disk full" in r.json()["detail"]
    assert fleet.stored() == 0 and fleet.quarantined() == []
    with fleet.store.write() as c:
        c.execute("DROP TRIGGER broken")
    assert metric(client, "edgefleet_ingest_write_errors_total") == 1
    assert post(client, fleet["dev-1"].message([1, 2])).json()["accepted"] == 2


def test_shutdown_commits_everything_that_was_handed_over(make_fleet: FleetFactory) -> None:
    fleet = make_fleet()
    app = create_app(fleet.settings, fleet.store)
    svc = attach_ingest(app, app.state.ctx)
    outcomes: list[Outcome] = []
    with TestClient(app):
        for i in range(40):
            svc.submit("summary", fleet["dev-1"].message(range(i * 25, i * 25 + 25)), topic_device=None,
                       source="http", done=outcomes.append)
    # The lifespan exit flushed before stopping: every message was committed and called back.
    assert len(outcomes) == 40 and all(o.ok for o in outcomes)
    assert fleet.stored() == 1000
    late: list[Outcome] = []
    svc.submit("summary", fleet["dev-1"].message([5000]), topic_device=None, source="http", done=late.append)
    assert late and late[0].error is not None  # after stop: refused, never silently dropped


def test_a_killed_validator_process_is_replaced_and_no_message_is_lost(fleet: Fleet) -> None:
    svc = IngestService(fleet.settings, fleet.store, validator_processes=1)
    svc.start()
    try:
        first = svc.worker_pids()
        assert len(first) == 1
        outcomes: list[Outcome] = []
        for i in range(40):
            svc.submit("summary", fleet["dev-1"].message(range(i * 10, i * 10 + 10)), topic_device="dev-1",
                       source="mqtt", done=outcomes.append)
            if i == 20:
                os.kill(first[0], signal.SIGKILL)  # e.g. the OOM killer, mid-stream
        assert wait_until(lambda: len(outcomes) == 40, 30), len(outcomes)
        assert all(o.ok and not o.rejected for o in outcomes)
        assert fleet.seqs("dev-1") == list(range(400))
        assert wait_until(lambda: svc.worker_pids() not in ([], first), 10), "the pool was not replaced"
        after = svc.ingest(fleet["dev-1"].message([400]))
        assert after.accepted == 1
    finally:
        assert svc.stop(10)


def test_a_validator_process_killed_while_idle_is_replaced_too(fleet: Fleet) -> None:
    """A process that dies holding no batch (the OOM killer between messages) used to go unnoticed: nothing
    replaced it, and every later message was validated in the server's own process."""
    svc = IngestService(fleet.settings, fleet.store, validator_processes=1)
    svc.start()
    try:
        first = svc.worker_pids()
        os.kill(first[0], signal.SIGKILL)
        assert wait_until(lambda: svc.worker_pids() not in ([], first), 60), "the idle process was not replaced"
        assert svc.ingest(fleet["dev-1"].message([1])).accepted == 1
    finally:
        assert svc.stop(10)


def test_a_clean_stop_is_not_reported_as_a_validator_failure(fleet: Fleet,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The idle-death report (above) must not fire when the server itself closes its processes: an operator
    reading "validator process failed" after every clean stop learns to ignore the line."""
    svc = IngestService(fleet.settings, fleet.store, validator_processes=2)
    svc.start()
    assert svc.ingest(fleet["dev-1"].message([1])).accepted == 1
    with caplog.at_level(logging.ERROR, logger="fleet_server"):
        assert svc.stop(10)
    assert not [r for r in caplog.records if "failed" in r.getMessage()], caplog.text


def test_a_stop_sent_to_the_whole_process_group_leaves_the_validators_to_the_server(fleet: Fleet) -> None:
    """systemd's default KillMode and `timeout` send SIGTERM to every process of the group: the validators must
    not die of it (the server stops them), or the stop reads as a crash and a replacement starts mid-stop."""
    svc = IngestService(fleet.settings, fleet.store, validator_processes=1)
    svc.start()
    try:
        pid = svc.worker_pids()[0]
        os.kill(pid, signal.SIGTERM)
        assert not wait_until(lambda: svc.worker_pids() != [pid], 1.5), "the validator died of SIGTERM"
        assert svc.ingest(fleet["dev-1"].message([1])).accepted == 1
    finally:
        assert svc.stop(10)


def test_a_signature_refusal_says_whether_the_key_or_the_document_is_wrong(http: Http) -> None:
    """A changed document signed by the enrolled key and a document signed by another key are different problems
    for the integrator; the refusal used to name the same key twice for the first."""
    client, fleet, _ = http
    tampered = fleet["dev-1"].message([1]).replace(b'"sum":', b'"sum":1', 1)
    detail = post(client, tampered).json()["rejected"][0]["detail"]
    assert "does not verify: the document was changed after it was signed" in detail, detail
    other = post(client, fleet["dev-1"].message([2], signer=generate_key())).json()["rejected"][0]["detail"]
    assert "is not signed by device dev-1's enrolled key" in other and "(signed by " in other, other


def test_submissions_with_no_rows_still_complete(fleet: Fleet) -> None:
    svc = IngestService(fleet.settings, fleet.store)
    svc.start()
    got: list[Outcome] = []
    svc.writer.submit(Submission("heartbeat", "mqtt", 0.0, done=got.append))
    assert svc.flush(5) and got and got[0].ok
    assert svc.stop(5)


# ---- the quarantine listing -----------------------------------------------------------------------------
def test_the_quarantine_listing_needs_a_viewer_and_filters_by_reason(http: Http) -> None:
    client, fleet, _ = http
    post(client, b"{nope")
    post(client, fleet["dev-1"].message([1], signer=generate_key()))
    post(client, fleet["dev-1"].message([2], version="9.9.9"))
    assert client.get("/api/v1/quarantine").status_code == 401
    auth = {"Authorization": f"Bearer {create_token(fleet.store, 'viewer')}"}
    rows = client.get("/api/v1/quarantine", headers=auth).json()
    assert [r["reason"] for r in rows] == ["unknown_model_version", "bad_signature", "malformed_json"]
    assert rows[2]["payload_preview"] == "{nope" and rows[2]["device_id"] is None
    assert rows[1]["device_id"] == "dev-1" and rows[1]["source"] == "http"
    only = client.get("/api/v1/quarantine?reason=bad_signature&limit=5", headers=auth).json()
    assert [r["reason"] for r in only] == ["bad_signature"]
    assert client.get("/api/v1/quarantine?limit=1", headers=auth).json()[0]["reason"] == "unknown_model_version"
    assert client.get("/api/v1/quarantine?reason=nonsense", headers=auth).status_code == 422


def test_all_rate_limited_answers_429_with_retry_after(make_http: Callable[..., Http]) -> None:
    client, fleet, _ = make_http(device_rate_per_minute=5)
    assert post(client, fleet["dev-1"].message(range(5))).json()["accepted"] == 5
    r = post(client, fleet["dev-1"].message(range(5, 8)))
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert [x["reason"] for x in r.json()["rejected"]] == ["rate_limited"] * 3
