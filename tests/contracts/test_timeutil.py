"""Wire timestamps: every malformed or unrepresentable one is a SchemaError naming the field, never another
exception (the fuzzers found none of these by chance; they are listed here so they stay refused)."""

from __future__ import annotations

import pytest

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.timeutil import duration_text, fmt, parse, parse_duration


@pytest.mark.parametrize("text", [
    "0001-01-01T00:00:00+01:00",  # before the first instant a datetime can hold, once in UTC
    "9999-12-31T23:59:59-01:00",  # after the last
    "2026-13-01T00:00:00Z", "2026-01-01T00:00:00", "yesterday", "", 1700000000, None, ["2026-01-01T00:00:00Z"],
])
def test_bad_timestamps_are_schema_errors_naming_the_field(text: object) -> None:
    with pytest.raises(SchemaError, match="window.end"):
        parse(text, "window.end")


def test_good_timestamps_normalise_to_utc() -> None:
    assert fmt(parse("2026-11-27T14:00:00+01:00", "t")) == "2026-11-27T13:00:00Z"
    assert fmt(parse("0001-01-01T00:00:00Z", "t")) == "0001-01-01T00:00:00Z"


@pytest.mark.parametrize(("seconds", "text"), [
    (30 * 86400, "30 days"), (86400, "1 day"), (12 * 3600, "12 hours"), (90 * 60, "90 minutes"), (60, "1 minute"),
    (4, "4 seconds"), (1, "1 second"), (1.5, "1.5 seconds"), (90000, "25 hours"), (400 * 86400, "400 days"),
])
def test_a_duration_is_written_in_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    if float(seconds).is_integer():  # and the flags read it back
        n, unit = text.split()
        assert parse_duration(n + {"day": "d", "hour": "h", "minute": "m", "second": "s"}[unit.rstrip("s")]
                              ).total_seconds() == seconds


def test_a_duration_flag_past_a_century_is_refused_not_a_traceback() -> None:
    with pytest.raises(SchemaError, match="longer than a century"):
        parse_duration("99999999999d")
