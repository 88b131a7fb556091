"""A summary's numbers must agree with each other (``consistency_problem``): each rule refuses a summary that
breaks it, naming the field, on the full path (``Summary.from_dict``) and on the server's fast path
(``fastpath.decode`` leaves it to the full path); noised releases are held only to the rules noise does not
touch. That every agent's output keeps the rules is ``tests/device_agent/test_summary_consistency.py``."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.summary import Summary
from fleet_server.ingest import fastpath
from tests.fleet_server.conftest import make_summary

Doc = dict[str, Any]
PLAIN: Doc = make_summary(3, "dev-1", count=20).to_dict()
NOISED: Doc = {**PLAIN, "privacy": {"epsilon": 1.0, "epsilon_spent": 1.0, "noise_variance": 2.0833}}


def _wire(doc: Doc) -> bytes:
    return b'[{"signed":' + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + \
        b',"signatures":[{"keyid":"' + b"a" * 64 + b'","sig":"' + base64.b64encode(bytes(64)) + b'"}]}]'


def _changed(doc: Doc, change: Callable[[Doc], None]) -> Doc:
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


def _bump(path: str, by: float = 1) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        key: Any = int(last) if last.isdigit() else last
        node[key] += by
    return change


def _latency_moved(doc: Doc) -> None:  # same total, another bin: fine
    lat = doc["ops"]["latency_counts"]
    i = lat.index(max(lat))
    lat[i] -= 1
    lat[0] += 1


# (change, the message's words); each breaks exactly one rule of a plain summary
BROKEN: dict[str, tuple[Callable[[Doc], None], str]] = {
    "latency_counts_add_up_to_more": (_bump("ops.latency_counts.0"), "summary.ops.latency_counts add up to 21, but "
                                                                     "window.count is 20"),
    "window_count_larger": (_bump("window.count", 5), "summary.ops.latency_counts add up to 20, but window.count "
                                                      "is 25"),
    "feature_counts_not_n": (_bump("features.1.counts.0"), r"summary.features\[1\] \(f1\): counts add up to 21, "
                                                             "but n is 20"),
    "feature_n_above_count": (lambda d: [_bump("features.0.n", 5)(d), _bump("features.0.counts.0", 5)(d)],
                              r"summary.features\[0\] \(f0\): n is 25, more than the window's 20 predictions"),
    "empty_bins_above_values": (lambda d: d["output"].__setitem__("empty_bins", 41),
                                "summary.output.empty_bins is 41, more than the 40 feature values counted"),
    "class_counts": (_bump("output.class_counts.0"), "summary.output.class_counts add up to 21, but window.count "
                                                     "is 20"),
    "confidence_counts": (_bump("output.confidence_counts.4", -1), "summary.output.confidence_counts add up to 19"),
    "calibrated_above_class": (lambda d: d["output"].__setitem__("calibrated_sum", [0.0, 20.5]),
                               r"summary.output.calibrated_sum\[1\] is 20.5, more than the class's 20 predictions"),
    "calibrated_above_noised_class": (lambda d: d["output"].__setitem__("calibrated_sum", [1.0, 18.0]),
                                      r"summary.output.calibrated_sum\[0\] is 1, more than the class's 0 predictions"),
    "calibrated_negative": (lambda d: d["output"].__setitem__("calibrated_sum", [-0.5, 18.0]),
                            "summary.output.calibrated_sum must not be negative"),
}


def test_the_plain_and_noised_documents_are_accepted_by_both_paths() -> None:
    for doc in (PLAIN, NOISED, _changed(PLAIN, _latency_moved)):
        assert Summary.from_dict(doc).count == 20
        assert fastpath.decode(_wire(doc)) is not None


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_rule_refuses_a_summary_that_breaks_it_on_both_paths(case: str) -> None:
    change, words = BROKEN[case]
    doc = _changed(PLAIN, change)
    with pytest.raises(SchemaError, match=words):
        Summary.from_dict(doc)
    assert fastpath.decode(_wire(doc)) is None, "the fast path must leave it to the full path, which names it"


@pytest.mark.parametrize("case", ["feature_counts_not_n", "class_counts", "confidence_counts",
                                  "calibrated_above_noised_class"])
def test_a_noised_release_may_break_the_rules_its_noise_touches(case: str) -> None:
    change, _ = BROKEN[case]
    doc = _changed(NOISED, change)
    assert Summary.from_dict(doc).epsilon == 1.0
    assert fastpath.decode(_wire(doc)) is not None


@pytest.mark.parametrize("case", ["latency_counts_add_up_to_more", "feature_n_above_count", "empty_bins_above_values",
                                  "calibrated_negative"])
def test_a_noised_release_keeps_the_rules_noise_does_not_touch(case: str) -> None:
    change, words = BROKEN[case]
    with pytest.raises(SchemaError, match=words):
        Summary.from_dict(_changed(NOISED, change))


def test_a_noised_release_cannot_claim_more_calibrated_confidence_than_predictions() -> None:
    doc = _changed(NOISED, lambda d: d["output"].__setitem__("calibrated_sum", [5.5, 15.0]))
    with pytest.raises(SchemaError, match="calibrated_sum adds up to 20.5, more than the window's 20 predictions"):
        Summary.from_dict(doc)
    assert fastpath.decode(_wire(doc)) is None


def test_rounding_of_calibrated_sums_is_tolerated() -> None:
    doc = _changed(PLAIN, lambda d: d["output"].__setitem__("calibrated_sum", [0.0, 20.0000000004]))
    assert Summary.from_dict(doc).calibrated_sum[1] == pytest.approx(20.0)
