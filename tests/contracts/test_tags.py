"""The tag contract (``key=value``): one rule for provision, enrollment, filters and cohorts. Split at the
first '='; a key is 1-64 characters without '='; a value is 0-128 characters and may be empty or hold '=';
neither holds a control or invisible character or begins or ends with whitespace; nothing is stripped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.tags import MAX_KEY_CHARS, MAX_VALUE_CHARS, check_tag, parse_tag


@pytest.mark.parametrize(("text", "pair"), [
    ("site=north", ("site", "north")),
    ("formula=a=b", ("formula", "a=b")),  # split at the first '='
    ("site=", ("site", "")),  # an empty value is a value
    ("k==", ("k", "=")),
    ('we"ird=v', ('we"ird', "v")),
    ("x' OR 1 --=v", ("x' OR 1 --", "v")),  # inner spaces are text
    ("a.b=$[0]", ("a.b", "$[0]")),
    ("ville=Zürich", ("ville", "Zürich")),
    ("k" * MAX_KEY_CHARS + "=" + "v" * MAX_VALUE_CHARS, ("k" * MAX_KEY_CHARS, "v" * MAX_VALUE_CHARS)),
])
def test_tags_by_the_rule_parse_to_key_and_value(text: str, pair: tuple[str, str]) -> None:
    assert parse_tag(text) == pair
    assert check_tag(*pair) == pair


@pytest.mark.parametrize(("text", "problem"), [
    ("site", "must look like key=value"),
    ("", "must look like key=value"),
    ("=north", "must look like key=value with a non-empty key"),
    ("k" * (MAX_KEY_CHARS + 1) + "=v", f"has a {MAX_KEY_CHARS + 1}-character key; a key is at most 64"),
    ("k=" + "v" * (MAX_VALUE_CHARS + 1), f"has a {MAX_VALUE_CHARS + 1}-character value; a value is at most 128"),
    ("si\nte=north", "U+000A in its key"),
    ("site=nor\x00th", "U+0000 in its value"),
    ("site=\tnorth", "U+0009 in its value"),
    ("site\u200b=north", "U+200B in its key"),  # zero-width space: two keys that look alike
    ("site=north\u202e", "U+202E in its value"),  # a bidi override
    ("site =north", "whitespace at the start or end of its key"),
    (" site=north", "whitespace at the start or end of its key"),
    ("site= north", "whitespace at the start or end of its value"),
    ("site=north\u00a0", "whitespace at the start or end of its value"),
    ("site= ", "whitespace at the start or end of its value"),
])
def test_anything_else_is_a_schema_error_naming_the_tag_and_the_problem(text: str, problem: str) -> None:
    with pytest.raises(SchemaError) as exc:
        parse_tag(text, "tag filter")
    assert str(exc.value).startswith(f"tag filter {repr(text)[:40]}")  # the text as typed, quoted
    assert problem in str(exc.value)


def test_a_key_holding_an_equals_sign_is_refused_as_a_pair() -> None:
    """It cannot arrive through key=value text (the first '=' ends the key), but it can as a JSON object."""
    with pytest.raises(SchemaError, match="has '=' in its key"):
        check_tag("a=b", "v")
    with pytest.raises(SchemaError, match="must be a string key and a string value"):
        check_tag("site", 3)


def test_a_huge_refused_tag_is_not_repeated_whole_in_the_message() -> None:
    with pytest.raises(SchemaError) as exc:
        parse_tag("k=" + "v" * 100_000)
    assert len(str(exc.value)) < 300


_printable = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp", "Zs"))
_keys = st.text(_printable, min_size=1, max_size=MAX_KEY_CHARS).filter(lambda k: "=" not in k)
_values = st.text(_printable, max_size=MAX_VALUE_CHARS)


@given(_keys, _values)
def test_every_pair_by_the_rule_round_trips_through_key_equals_value(key: str, value: str) -> None:
    assert check_tag(key, value) == (key, value)
    assert parse_tag(f"{key}={value}") == (key, value)
