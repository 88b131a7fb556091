"""Hypothesis fuzzing of every parser in edgefleet_contracts that reads untrusted input: manifest, keyset,
summary, desired state (command), report, profile, topics, versions, the untrusted-JSON reader, the signed
envelope decisions and the package archive reader.

Two kinds of input: random bytes (through ``parse_json`` and, when they parse, on into every document parser),
and structured mutations of real valid documents (a field replaced by any JSON value, deleted or added, at any
depth), also re-signed with the real key so the checks behind the signature are reached. The property: no
exception escapes other than the package's own ``ContractError`` tree.
"""

from __future__ import annotations

import copy
import json
import os
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet_contracts.archive import open_package
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.desired import Desired, accept_desired
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.keyset import Keyset
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.report import Report
from edgefleet_contracts.signing import generate_key, load_private_key, load_public_key, sign_envelope
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.topics import parse_topic
from edgefleet_contracts.trust import verify_keyset, verify_manifest
from edgefleet_contracts.versions import parse_version
from tests.device_agent.conftest import summary

# EDGEFLEET_FUZZ_EXAMPLES=5000 for a deeper run; no example database is kept (runs are independent).
EXAMPLES = int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NOW = datetime.now(UTC).replace(microsecond=0)
FLEET = generate_key()

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def only_contract_errors(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call ``fn``; a ContractError is an acceptable answer, anything else propagates (a bug)."""
    try:
        return fn(*args, **kw)
    except ContractError:
        return None


# ---- the real valid documents ------------------------------------------------------------------------------
class Docs:
    def __init__(self, built: Any) -> None:
        with tarfile.open(built.package, "r:") as tar:
            def read(name: str) -> Any:
                fh = tar.extractfile(name)
                assert fh is not None
                return json.loads(fh.read())

            self.keyset_env, self.manifest_env = read("keyset.json"), read("manifest.json")
            self.profile, self.calibration = read("profile.json"), read("calibration.json")
        self.root_key = load_private_key(built.keys / "root.key")
        self.root = load_public_key(built.keys / "root.pub")
        self.keyset = Keyset.from_signed(self.keyset_env["signed"])
        from model_packager.keys import KeyFolder

        self.signer = KeyFolder(built.keys).signing_key()[0]
        self.summary = summary(7).to_dict()
        self.desired = Desired("dev-1", 9, "clinical", "1.1.0", "http://127.0.0.1:1/p", "a" * 64, 100, NOW,
                               NOW + timedelta(hours=1), "r-1", "stage 1").to_signed()
        self.report = Report("dev-1", "2026-01-01T00:00:00Z", {"name": "clinical", "version": "1.0.0"}, None,
                             "idle", None).to_dict()
        self.package = built.package.read_bytes()
        self.package_path = built.package


@pytest.fixture(scope="module")
def docs(built: Any) -> Docs:
    return Docs(built)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with 1..3 mutations: a value replaced by any JSON value, a key deleted, or a key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        value = draw(JSON)
        if not path:
            doc = value
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace" or not isinstance(parent, dict | list):
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = value
        else:
            parent.insert(path[-1], value)
    return doc


def signed_by(doc: Any, key: Any) -> Any:
    """An envelope of ``doc`` signed by ``key`` (None when ``doc`` has no canonical form: NaN, Infinity)."""
    return only_contract_errors(sign_envelope, doc, key) if isinstance(doc, dict) else None


# ---- random bytes -----------------------------------------------------------------------------------------
def _every_document_parser(doc: Any, d: Docs) -> None:
    for parse in (Manifest.from_signed, Keyset.from_signed, Summary.from_dict, Desired.from_signed,
                  Report.from_dict, Profile.from_dict, CalibrationMap.from_dict):
        only_contract_errors(parse, doc)
    only_contract_errors(verify_keyset, doc, d.root, NOW)
    only_contract_errors(verify_manifest, doc, d.keyset, NOW)
    only_contract_errors(accept_desired, doc, FLEET.public_key(), device_id="dev-1", last_seq=0, now=NOW)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes_never_escape_the_contract_errors(docs, raw):
    doc = only_contract_errors(parse_json, raw)
    if doc is not None:
        _every_document_parser(doc, docs)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from('[]{}",:0123456789.eE+-truefalsnNaIiy \\u'), max_size=200))
def test_json_shaped_text_never_escapes_the_contract_errors(docs, text):
    doc = only_contract_errors(parse_json, text)
    if doc is not None:
        _every_document_parser(doc, docs)


@FUZZ
@given(doc=JSON)
def test_any_json_value_never_escapes_the_contract_errors(docs, doc):
    _every_document_parser(doc, docs)
    only_contract_errors(parse_version, doc)
    if isinstance(doc, str):
        only_contract_errors(parse_topic, doc)


# ---- structured mutations of valid documents ----------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_mutated_manifests_never_escape_the_contract_errors(docs, data):
    doc = data.draw(mutated(docs.manifest_env["signed"]))
    only_contract_errors(Manifest.from_signed, doc)
    env = signed_by(doc, docs.signer)  # signed by the real delegated key: every check after the signature runs
    if env is not None:
        only_contract_errors(verify_manifest, env, docs.keyset, NOW)
    only_contract_errors(verify_manifest, data.draw(mutated(docs.manifest_env)), docs.keyset, NOW)


@FUZZ
@given(data=st.data())
def test_mutated_keysets_never_escape_the_contract_errors(docs, data):
    doc = data.draw(mutated(docs.keyset_env["signed"]))
    only_contract_errors(Keyset.from_signed, doc)
    env = signed_by(doc, docs.root_key)  # root-signed: the schema and expiry checks behind it run
    if env is not None:
        ks = only_contract_errors(verify_keyset, env, docs.root, NOW)
        if ks is not None:
            only_contract_errors(verify_manifest, docs.manifest_env, ks, NOW)
    only_contract_errors(verify_keyset, data.draw(mutated(docs.keyset_env)), docs.root, NOW)


@FUZZ
@given(data=st.data())
def test_mutated_summaries_never_escape_the_contract_errors(docs, data):
    doc = data.draw(mutated(docs.summary))
    s = only_contract_errors(Summary.from_dict, doc)
    if s is not None:
        again = only_contract_errors(Summary.from_dict, json.loads(json.dumps(s.to_dict())))
        assert again is not None, "an accepted summary must read back"


@FUZZ
@given(data=st.data())
def test_mutated_desired_states_never_escape_the_contract_errors(docs, data):
    doc = data.draw(mutated(docs.desired))
    only_contract_errors(Desired.from_signed, doc)
    env = signed_by(doc, FLEET)
    if env is not None:
        only_contract_errors(accept_desired, env, FLEET.public_key(), device_id="dev-1", last_seq=0, now=NOW)
    only_contract_errors(accept_desired, data.draw(mutated(sign_envelope(docs.desired, FLEET))), FLEET.public_key(),
                         device_id="dev-1", last_seq=0, now=NOW)


@FUZZ
@given(data=st.data())
def test_mutated_reports_and_profiles_never_escape_the_contract_errors(docs, data):
    only_contract_errors(Report.from_dict, data.draw(mutated(docs.report)))
    only_contract_errors(Profile.from_dict, data.draw(mutated(docs.profile)))
    only_contract_errors(CalibrationMap.from_dict, data.draw(mutated(docs.calibration)))


# ---- the archive reader -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-packages")


@settings(max_examples=max(1, EXAMPLES * 3 // 5), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 8192))
def test_damaged_package_archives_never_escape_the_contract_errors(docs, scratch, flips, cut):
    """Bytes of the tar headers and the metadata members overwritten (and the file cut short): the reader
    answers with a ContractError (or verifies, when the change hit padding), never with a tarfile, struct,
    Unicode or OS error."""
    raw = bytearray(docs.package)
    for offset, value in flips:
        raw[offset % len(raw)] = value
    if cut is not None:
        raw = raw[:cut]
    path = scratch / "fuzzed.efpkg"
    path.write_bytes(bytes(raw))
    staging = scratch / "staging"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir()
    only_contract_errors(open_package, path, docs.root, now=NOW, target="x86_64-avx2", staging=staging)


def test_the_fuzzer_reaches_the_checks_behind_the_signatures(docs):
    """Control: the unmutated documents pass, so the mutations above start from valid ground."""
    assert Manifest.from_signed(docs.manifest_env["signed"]).name == "clinical"
    assert verify_keyset(docs.keyset_env, docs.root, NOW).version >= 1
    assert verify_manifest(docs.manifest_env, docs.keyset, NOW)[0].version == "1.0.0"
    assert accept_desired(sign_envelope(docs.desired, FLEET), FLEET.public_key(), device_id="dev-1", last_seq=0,
                          now=NOW).seq == 9
    assert Summary.from_dict(docs.summary).seq == 7
    assert open_package(docs.package_path, docs.root, now=NOW, target="x86_64-avx2").manifest.name == "clinical"
