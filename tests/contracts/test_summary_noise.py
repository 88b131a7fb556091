"""The summary contract for noised releases: signed counts only under ``privacy.epsilon``, noise variance."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.summary import Summary, merge
from tests.fleet_server.conftest import make_summary

PLAIN = make_summary(3, "dev-1").to_dict()
NOISED = {**PLAIN, "privacy": {"epsilon": 1.0, "epsilon_spent": 1.0, "noise_variance": 2.0833}}


def _set(doc: dict[str, Any], where: str, value: int) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    if where == "feature":
        doc["features"][0]["counts"][0] = value
    else:
        doc["output"][where][0] = value
    return doc


@pytest.mark.parametrize("where", ["feature", "class_counts", "confidence_counts"])
def test_negative_histogram_counts_are_allowed_only_in_a_noised_summary(where: str) -> None:
    s = Summary.from_dict(_set(NOISED, where, -3))
    assert -3 in (s.features[0].counts + s.class_counts + s.confidence_counts)
    assert s.noise_variance == 2.0833 and Summary.from_dict(s.to_dict()) == s
    with pytest.raises(SchemaError, match=r"non-negative integers \(negative counts only in a noised summary"):
        Summary.from_dict(_set(PLAIN, where, -3))


def test_counts_that_noise_does_not_touch_stay_non_negative_in_a_noised_summary() -> None:
    doc = copy.deepcopy(NOISED)
    doc["ops"]["latency_counts"][0] = -1
    with pytest.raises(SchemaError, match="latency_counts must be a list of non-negative integers"):
        Summary.from_dict(doc)
    doc = copy.deepcopy(NOISED)
    doc["features"][0]["missing"] = -1
    with pytest.raises(SchemaError, match="missing"):
        Summary.from_dict(doc)


@pytest.mark.parametrize(("privacy", "problem"), [
    ({"epsilon": 0.0}, "epsilon must be positive"),
    ({"epsilon": -1.0}, "epsilon must be positive"),
    ({"epsilon": None, "noise_variance": 2.0}, "noise_variance must be non-negative, and 0 without"),
    ({"epsilon": 1.0, "noise_variance": -2.0}, "noise_variance must be non-negative"),
    ({"epsilon": 1.0, "noise_variance": "2"}, "noise_variance must be a finite number"),
])
def test_the_privacy_block_is_checked(privacy: dict[str, Any], problem: str) -> None:
    with pytest.raises(SchemaError, match=problem):
        Summary.from_dict({**PLAIN, "privacy": privacy})


def test_merged_releases_add_their_noise_variance_and_plain_summaries_carry_none() -> None:
    a = Summary.from_dict({**NOISED, "seq": 1})
    b = Summary.from_dict({**NOISED, "seq": 2})
    assert merge(a, b).noise_variance == pytest.approx(2 * 2.0833)
    assert "noise_variance" not in Summary.from_dict(PLAIN).to_dict()["privacy"]  # unchanged wire for the rest
