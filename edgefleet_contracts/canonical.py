"""Canonical JSON: the exact bytes that are signed and verified.

Sorted keys, no insignificant whitespace, UTF-8, and no NaN or Infinity (they have no JSON form and would make
two honest parties disagree about the bytes). Both signer and verifier call :func:`canonical_bytes` on the
``signed`` part of an envelope, so a signature never depends on how a document was pretty-printed in transit.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import SchemaError

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32


def canonical_bytes(obj: Any) -> bytes:
    """Serialise ``obj`` canonically. Raises SchemaError for NaN/Infinity or unserialisable values."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"document cannot be serialised canonically: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise SchemaError(f"document contains {name}, which is not valid JSON")


def _depth(obj: Any, limit: int) -> int:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def parse_json(data: bytes | str, *, what: str = "document", max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse untrusted JSON with a size limit, a nesting limit and no NaN/Infinity.

    Raises SchemaError naming ``what`` on any problem; never lets a json/recursion error escape.
    """
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise SchemaError(f"{what} is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{what} is not UTF-8: {exc}") from exc
    # Cheap pre-check so a deeply nested document cannot exhaust the parser's recursion.
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise SchemaError(f"{what} nests deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except SchemaError:
        raise
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"{what} is not valid JSON: {exc}") from exc
