"""Model versions: dotted whole numbers (``1``, ``1.2``, ``1.2.3``), compared numerically."""

from __future__ import annotations

import re

from .errors import SchemaError

_VERSION = re.compile(r"\A[0-9]{1,9}(\.[0-9]{1,9}){0,3}\Z")


def parse_version(text: object) -> tuple[int, ...]:
    """Raises SchemaError when ``text`` is not a dotted version such as 1.2.3."""
    if not isinstance(text, str) or not _VERSION.match(text):
        raise SchemaError(f"version {text!r} must be dotted whole numbers such as 1.2.3")
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (4 - len(parts))


def is_newer(candidate: str, current: str) -> bool:
    return parse_version(candidate) > parse_version(current)
