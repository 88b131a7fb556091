"""Identifiers on the wire and on disk (device and fleet ids, model names and versions, package paths, digests)
match their rule as a whole: ``$`` also matches before a final newline and ``\\d`` any Unicode digit, so
``"d9\\n"`` passed for a device id (and `provision` wrote a config.toml no agent could load) and ``"٢.٠.٠"`` for a
version (installed on a device). Each check refuses them, naming the value."""

from __future__ import annotations

import pytest

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.manifest import _NAME, _PATH, _SHA256
from edgefleet_contracts.topics import check_id
from edgefleet_contracts.versions import parse_version

SHA = "ab" * 32


@pytest.mark.parametrize("bad", ["d9\n", "d9\r\n", "\nd9", "d 9", "d9\x00", "", ".", "..", "a" * 65])
def test_a_device_or_fleet_id_with_a_line_break_or_other_character_is_refused(bad: str) -> None:
    with pytest.raises(SchemaError, match="must be 1-64 characters"):
        check_id(bad, "device id")
    assert check_id("d9", "device id") == "d9"


@pytest.mark.parametrize("bad", ["1.0.1\n", "\u0662.\u0660.\u0660", "1.\u0661", "１.0", "1..0", "1.0.0.0.0", "v1"])
def test_a_version_is_ascii_digits_and_dots_only(bad: str) -> None:
    with pytest.raises(SchemaError, match="dotted whole numbers"):
        parse_version(bad)
    assert parse_version("1.2.3") == (1, 2, 3, 0)


@pytest.mark.parametrize(("pattern", "good", "bad"), [
    (_NAME, "clinical", "clinical\n"),
    (_SHA256, SHA, SHA + "\n"),
    (_PATH, "model/model.onnx", "model.onnx\n"),
])
def test_manifest_names_paths_and_digests_match_as_a_whole(pattern, good: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    assert pattern.match(good) and not pattern.match(bad)
