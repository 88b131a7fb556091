import pytest

from edgefleet_contracts import SchemaError, canonical_bytes, parse_json


def test_canonical_bytes_do_not_depend_on_key_order():
    assert canonical_bytes({"b": 1, "a": [1, 2]}) == canonical_bytes({"a": [1, 2], "b": 1}) == b'{"a":[1,2],"b":1}'


def test_nan_cannot_be_signed():
    with pytest.raises(SchemaError, match="canonically"):
        canonical_bytes({"x": float("nan")})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not valid JSON"),
        (b'{"x": NaN}', "NaN"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100 + b"]" * 100, "nests deeper"),
        (b" " * 2000, "over the 1000-byte limit"),
    ],
)
def test_untrusted_json_gets_a_clear_error(raw, message):
    with pytest.raises(SchemaError, match=message):
        parse_json(raw, what="summary", max_bytes=1000)


def test_a_signature_with_a_non_ascii_character_is_a_schema_error() -> None:
    """base64 raises ValueError (not binascii.Error) for non-ASCII text: found by the fuzzer in CI."""
    from edgefleet_contracts.signing import envelope_signatures

    with pytest.raises(SchemaError, match="not base64"):
        envelope_signatures({"signed": {}, "signatures": [{"keyid": "k", "sig": "\x80"}]}, "desired state")
