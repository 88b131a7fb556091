"""``device-agent provision --tag`` takes tags by the tag contract (``edgefleet_contracts.tags``), so a device is
only ever written tags the fleet server can store and filter on: split at the first '=', an empty value kept,
and a tag that is no tag (a control character, edge whitespace, an over-long key) a usage error naming the
problem, before any folder exists. Nothing is stripped."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.cli import main
from device_agent.config import DeviceDir
from device_agent.provision import ProvisionError, parse_tag

from . import TARGET, packages


def _args(built, d: Path, *extra: str) -> list[str]:
    return ["provision", "--dir", str(d), "--device-id", "ward3-01", "--target", TARGET,
            "--root-key", str(built.keys / "root.pub"), "--fleet-key", str(packages(built).fleet_pub), *extra]


@pytest.mark.parametrize(("tag", "problem"), [
    ("site=ward\n3", "U+000A in its value"),  # would have broken config.toml
    ("si\tte=ward-3", "U+0009 in its key"),
    ("site = ward-3", "whitespace at the start or end of its key"),  # was quietly provisioned as site=ward-3
    ("site= ward-3", "whitespace at the start or end of its value"),
    ("k" * 65 + "=v", "65-character key"),  # the server would refuse it at enrollment
])
def test_a_tag_that_is_no_tag_is_a_usage_error_naming_the_problem(built, tmp_path, capsys, tag, problem):
    assert main(_args(built, tmp_path / "dev", "--tag", tag)) == 2
    err = capsys.readouterr().err
    assert "argument --tag: tag " in err and problem in err and "(e.g. --tag site=ward-3)" in err
    assert not (tmp_path / "dev").exists()


def test_values_may_be_empty_or_hold_equals_signs(built, tmp_path):
    d = tmp_path / "dev"
    assert main(_args(built, d, "--tag", "formula=a=b", "ring=")) == 0
    assert DeviceDir(d).load_config().tags == {"formula": "a=b", "ring": ""}


def test_parse_tag_keeps_its_error_type_and_reason():
    with pytest.raises(ProvisionError, match="U\\+0000 in its value") as exc:
        parse_tag("site=a\x00b")
    assert exc.value.reason == "bad_tag"
    assert parse_tag("site=ward-3") == ("site", "ward-3")
