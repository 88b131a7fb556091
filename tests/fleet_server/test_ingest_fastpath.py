"""The ingest fast path (``fleet_server.ingest.fastpath``) decides nothing the full path would decide otherwise.

- Differential fuzzing: documents mutated at random (any field replaced by any JSON value, deleted, added) are
  accepted by ``fastpath.decode`` only if ``Summary.from_dict`` accepts them too, with the same fields.
- The signed bytes are found in the message only for the agent's exact layout; any other layout (escaped
  keys, an extra key, a nested ``signatures``, spaces, keys in another order) goes to the full path.
- Through the real validator with real keys: the agent's messages are stored with the received signed bytes
  as the body; earlier agents' messages (keys unsorted) still verify; a device key signing a crafted framing
  cannot store a body that is not the document that was checked.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet_contracts.canonical import canonical_bytes
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.signing import envelope_json, key_id, sign_envelope
from edgefleet_contracts.summary import Summary
from fleet_server.ingest import Validator, fastpath
from tests.fleet_server.conftest import Fleet, make_summary
from tests.hardening.test_fuzz_parsers import JSON, _paths, mutated

EXAMPLES = int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VALID = make_summary(3, "dev-1").to_dict()
LABELLED = {**VALID, "labels": {"confusion": [[0, 0], [1, 9]]},
            "privacy": {"epsilon": 1.0, "epsilon_spent": 0.5, "noise_variance": 2.0833}}  # the optional parts present


def _wire(doc: Any) -> bytes:
    """``doc`` as the signed part of one envelope in the agent's layout (a fixed, unverified signature)."""
    return b'[{"signed":' + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + \
        b',"signatures":[{"keyid":"' + b"a" * 64 + b'","sig":"' + base64.b64encode(bytes(64)) + b'"}]}]'


def _full_path(doc: Any) -> Summary | None:
    try:
        return Summary.from_dict(doc)
    except ContractError:
        return None


def test_the_valid_document_takes_the_fast_path() -> None:
    envs = fastpath.decode(_wire(VALID))
    assert envs is not None and len(envs) == 1
    s, full = envs[0].signed, Summary.from_dict(VALID)
    assert (s.device_id, s.seq, s.model.name, s.model.version, s.window.count) == \
        (full.device_id, full.seq, full.model, full.version, full.count)


@FUZZ
@given(doc=mutated(VALID))
def test_fast_path_accepts_only_what_the_full_path_accepts(doc: Any) -> None:
    try:
        wire = _wire(doc)
    except (TypeError, ValueError):  # NaN and the like have no JSON form: nothing to send
        return
    envs = fastpath.decode(wire)
    if envs is None:
        return  # the full path decides
    full = _full_path(json.loads(wire)[0]["signed"])
    assert full is not None, f"fast path accepted a document the full path refuses: {doc!r}"
    s = envs[0].signed
    assert (s.device_id, s.seq, s.model.name, s.model.version, s.window.start, s.window.end, s.window.count) == \
        (full.device_id, full.seq, full.model, full.version, full.start, full.end, full.count)
    assert [f.counts for f in s.features] == [f.counts for f in full.features]


NEAR_MISSES: list[Any] = [-1, 0, True, False, 1.5, -0.0, 2**63, 2**64, "", "x", None, [], {}, [-1], [1.5], [True],
                          1e308, "2026-13-01T00:00:00Z", "2026-01-01T00:00:00", "\u00e9", {"name": "x"}]
_DROP = object()
# Every field once: list items only at index 0 and 1 (the 30x22 feature counts would otherwise be most paths).
PATHS = [p for p in _paths(LABELLED) if p and all(not isinstance(x, int) or x < 2 for x in p)]


def _with(path: tuple[Any, ...], value: Any, base: Any = LABELLED) -> Any:
    doc = copy.deepcopy(base)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if value is _DROP:
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return doc


def test_every_field_with_every_near_miss_or_deleted_never_slips_through() -> None:
    """Each field (at any depth) replaced by each value that is almost right, or deleted: exhaustive."""
    assert _full_path(LABELLED) is not None and fastpath.decode(_wire(LABELLED)) is not None
    slipped, fast = [], 0
    for path in PATHS:
        for value in [*NEAR_MISSES, _DROP]:
            wire = _wire(_with(path, value))
            if fastpath.decode(wire) is not None:
                fast += 1
                if _full_path(json.loads(wire)[0]["signed"]) is None:
                    slipped.append((path, value))
    assert not slipped, f"the fast path accepted what the full path refuses: {slipped[:5]}"
    assert fast > len(PATHS), "some near misses are valid (e.g. 0 counts): the fast path must take those"


@FUZZ
@given(path=st.sampled_from(PATHS), value=JSON)
def test_any_json_value_anywhere_never_slips_through(path: tuple[Any, ...], value: Any) -> None:
    wire = _wire(_with(path, value))
    if fastpath.decode(wire) is not None:
        assert _full_path(json.loads(wire)[0]["signed"]) is not None, (path, value)


def test_a_field_this_server_does_not_know_goes_to_the_full_path_however_deep() -> None:
    """A newer agent's extra field: the full path ignores it (and refuses it past 32 levels of nesting); the fast
    path, which needs no nesting pre-scan because it accepts known fields only, leaves it to the full path."""
    extra = {**VALID, "future": {"a": [1, 2]}}
    assert fastpath.decode(_wire(extra)) is None and _full_path(extra) is not None
    deep = _wire({**VALID, "future": "here"}).replace(b'"here"', b"[" * 5000 + b"]" * 5000)
    assert fastpath.decode(deep) is None  # no RecursionError escapes


def _agent_message(fleet: Fleet, seqs: list[int]) -> bytes:
    return fleet["dev-1"].message(seqs)


def test_spans_are_the_exact_signed_bytes_of_every_envelope(fleet: Fleet) -> None:
    dev = fleet["dev-1"]
    payload = dev.message([1, 2, 3])
    envs = fastpath.decode(payload)
    assert envs is not None
    spans = fastpath.signed_spans(payload, envs)
    assert spans is not None
    for seq, (a, b) in zip([1, 2, 3], spans, strict=True):
        assert payload[a:b] == canonical_bytes(make_summary(seq, "dev-1").to_dict())
    single = envelope_json(dev.envelope(4))  # one envelope, not in a list
    one = fastpath.decode(single)
    assert one is not None and fastpath.signed_spans(single, one) is not None


@pytest.mark.parametrize("change", [
    "escaped duplicate key", "extra envelope key", "nested signatures key", "keys swapped", "trailing bytes",
    "escaped string"])
def test_any_other_layout_leaves_the_fast_path(fleet: Fleet, change: str) -> None:
    dev = fleet["dev-1"]
    env = dev.envelope(1)
    signed = canonical_bytes(env["signed"])
    sigs = json.dumps(env["signatures"], separators=(",", ":")).encode()
    layouts = {
        "escaped duplicate key": b'{"signed":' + signed + b',"sign\\u0065d":' + signed + b',"signatures":' + sigs +
                                 b"}",
        "extra envelope key": b'{"signed":' + signed + b',"x":1,"signatures":' + sigs + b"}",
        "nested signatures key": b'{"signed":' + canonical_bytes({**env["signed"], "signatures": []}) +
                                 b',"signatures":' + sigs + b"}",
        "escaped string": b'{"signed":' + signed.replace(b'"f0"', b'"f\\u0030"') + b',"signatures":' + sigs + b"}",
        "keys swapped": b'{"signatures":' + sigs + b',"signed":' + signed + b"}",
        "trailing bytes": b'{"signed":' + signed + b',"signatures":' + sigs + b"} ",
    }
    payload = layouts[change]
    envs = fastpath.decode(payload)
    assert envs is None or fastpath.signed_spans(payload, envs) is None


def test_agent_messages_are_stored_with_the_received_bytes(fleet: Fleet) -> None:
    v = Validator(fleet.settings, fleet.store)
    payload = fleet["dev-1"].message([1, 2])
    checked = v.validate(payload, topic_device=None, source="http")
    assert [a.seq for a in checked.accepted] == [1, 2] and checked.rejected == []
    for a in checked.accepted:
        assert a.body.encode() in payload  # the slice itself, not a re-serialisation
        assert a.body.encode() == canonical_bytes(make_summary(a.seq, "dev-1").to_dict())


def test_earlier_agents_messages_still_verify(fleet: Fleet) -> None:
    v = Validator(fleet.settings, fleet.store)
    legacy = fleet["dev-1"].legacy_message([5])
    checked = v.validate(legacy, topic_device=None, source="http")
    assert [a.seq for a in checked.accepted] == [5] and checked.rejected == []
    assert checked.accepted[0].body.encode() == canonical_bytes(make_summary(5, "dev-1").to_dict())


def test_a_forged_signature_is_refused_on_the_fast_path_too(fleet: Fleet) -> None:
    from edgefleet_contracts.signing import generate_key

    v = Validator(fleet.settings, fleet.store)
    forged = fleet["dev-1"].message([6], signer=generate_key())
    checked = v.validate(forged, topic_device=None, source="http")
    assert checked.accepted == [] and [r.reason for r in checked.rejected] == ["bad_signature"]
    tampered = fleet["dev-1"].message([7]).replace(b'"seq":7', b'"seq":8')
    checked = v.validate(tampered, topic_device=None, source="http")
    assert checked.accepted == [] and [r.reason for r in checked.rejected] == ["bad_signature"]


@pytest.mark.parametrize("framing", ["escaped duplicate", "second object"])
def test_a_device_key_signing_a_crafted_framing_cannot_store_another_document(fleet: Fleet, framing: str) -> None:
    """A device key (stolen, or a broken agent) signs bytes S that are not one JSON object; whatever is
    decided, every stored body is a JSON object equal to a document that passed the checks."""
    dev = fleet["dev-1"]
    a = canonical_bytes(make_summary(10, "dev-1").to_dict())
    b = canonical_bytes(make_summary(11, "dev-1").to_dict())
    crafted = a + (b',"sign\\u0065d":' if framing == "escaped duplicate" else b"},{\"signed\":") + b
    sig = base64.b64encode(dev.key.sign(crafted)).decode()
    payload = b'[{"signed":' + crafted + b',"signatures":[{"keyid":"' + key_id(dev.key.public_key()).encode() + \
        b'","sig":"' + sig.encode() + b'"}]}]'
    v = Validator(fleet.settings, fleet.store)
    try:
        checked = v.validate(payload, topic_device=None, source="http")
    except Exception as exc:  # the whole message refused (malformed_json/shape): nothing to store
        assert getattr(exc, "reason", None) in ("malformed_json", "shape"), exc
        return
    for acc in checked.accepted:
        doc = json.loads(acc.body)
        assert isinstance(doc, dict) and Summary.from_dict(doc).seq == acc.seq


def test_sign_envelope_and_envelope_json_carry_the_same_signature(fleet: Fleet) -> None:
    dev = fleet["dev-1"]
    doc = make_summary(1, "dev-1").to_dict()
    env = sign_envelope(doc, dev.key)
    wire = json.loads(envelope_json(env))
    assert wire == json.loads(json.dumps(env))
    assert envelope_json(env).startswith(b'{"signed":' + canonical_bytes(doc) + b',"signatures":')


def test_a_non_ascii_signature_is_a_bad_signature_not_a_server_error(fleet: Fleet) -> None:
    v = Validator(fleet.settings, fleet.store)
    env = fleet["dev-1"].envelope(9)
    env["signatures"][0]["sig"] = "é" * 88
    payload = b"[" + envelope_json(env) + b"]"
    assert fastpath.decode(payload) is not None  # it is the fast path that meets it
    checked = v.validate(payload, topic_device=None, source="http")
    assert checked.accepted == [] and [r.reason for r in checked.rejected] == ["bad_signature"]
