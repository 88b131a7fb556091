"""The validator's batch path (what the validator processes run): the same answers as one message at a time,
one look-up per batch that still sees a re-enrolment at once, duplicates found across messages, and window
times normalised and checked against the clock exactly as the slow path does."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from edgefleet_contracts.signing import generate_key, public_b64, sign_envelope
from edgefleet_contracts.timeutil import fmt
from fleet_server.devices import enroll
from fleet_server.ingest import IngestService, Submission, Validator
from tests.fleet_server.conftest import Fleet, make_summary


def _shape(sub: Submission) -> tuple[object, ...]:
    return (sub.kind, [(a.device_id, a.seq, a.start, a.end, a.body, a.duplicate) for a in sub.summaries],
            [(r.index, r.reason, r.device_id) for r in sub.rejections], sub.seen)


def test_a_batch_gets_the_same_answers_as_one_message_at_a_time(fleet: Fleet) -> None:
    d1, d2 = fleet["dev-1"], fleet["dev-2"]
    IngestService(fleet.settings, fleet.store).writer._write([  # seq 0 of dev-1 is already stored
        Validator(fleet.settings, fleet.store).check("summary", d1.message([0]), topic_device="dev-1",
                                                     source="mqtt")])
    work = [
        ("summary", d1.message([0, 1, 2]), "dev-1", "mqtt"),  # a duplicate and two new
        ("summary", d2.message([5], signer=generate_key()), "dev-2", "mqtt"),  # forged
        ("summary", d1.message([3]), "dev-2", "mqtt"),  # on another device's topic
        ("summary", b"{not json", "dev-1", "mqtt"),
        ("heartbeat", json.dumps({"device_id": "dev-2"}).encode(), "dev-2", "mqtt"),
        ("summary", d2.message([6, 7]), None, "http"),
        ("nonsense", b"{}", "dev-1", "mqtt"),
    ]
    batch = [sub.resolve(w[1]) for sub, w in zip(Validator(fleet.settings, fleet.store).check_batch(work), work,
                                                   strict=True)]
    one_by_one = [Validator(fleet.settings, fleet.store).check(k, p, topic_device=t, source=s) for k, p, t, s in work]
    assert [_shape(s) for s in batch] == [_shape(s) for s in one_by_one]
    assert [a.duplicate for a in batch[0].summaries] == [True, False, False]
    assert [[r.reason for r in s.rejections] for s in batch] == [
        [], ["bad_signature"], ["topic_mismatch"], ["malformed_json"], [], [], ["shape"]]


def test_a_re_enrolment_takes_effect_for_the_next_batch(fleet: Fleet) -> None:
    v = Validator(fleet.settings, fleet.store)
    dev = fleet["dev-1"]
    assert v.check_batch([("summary", dev.message([1]), "dev-1", "mqtt")])[0].summaries  # key read and cached
    new_key = generate_key()
    enroll(fleet.store, fleet.settings.fleet, "dev-1", public_b64(new_key.public_key()), replace=True)
    old, new = v.check_batch([("summary", dev.message([2]), "dev-1", "mqtt"),
                              ("summary", dev.message([3], signer=new_key), "dev-1", "mqtt")])
    assert [r.reason for r in old.rejections] == ["bad_signature"]
    assert [a.seq for a in new.summaries] == [3]


def test_window_times_are_normalised_and_the_future_is_refused_at_the_same_limit(fleet: Fleet) -> None:
    v = Validator(fleet.settings, fleet.store)
    dev = fleet["dev-1"]
    s = make_summary(1, "dev-1")
    doc = s.to_dict()  # the same instant written with a +02:00 offset: stored as ...Z
    end = datetime.fromisoformat(s.end.replace("Z", "+00:00"))
    doc["window"]["end"] = end.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert doc["window"]["end"].endswith("+02:00")
    [sub] = v.check_batch([("summary", json.dumps([sign_envelope(doc, dev.key)]).encode(), "dev-1", "mqtt")])
    assert sub.rejections == [] and sub.summaries[0].end == s.end

    now = datetime.now(UTC).replace(microsecond=0)
    for ahead, refused in ((timedelta(minutes=4), False), (timedelta(minutes=6), True)):
        late = replace(s, seq=2 + refused, start=fmt(now - timedelta(seconds=60)), end=fmt(now + ahead))
        body = json.dumps([sign_envelope(late.to_dict(), dev.key)]).encode()
        [sub] = v.check_batch([("summary", body, "dev-1", "mqtt")])
        assert [r.reason for r in sub.rejections] == (["future_timestamp"] if refused else []), ahead
        assert len(sub.summaries) == (0 if refused else 1)
