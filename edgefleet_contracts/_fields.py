"""Small typed field readers for validating untrusted dicts with errors that name the field."""

from __future__ import annotations

from typing import Any

from .errors import SchemaError


def obj(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise SchemaError(f"{what} must be an object, got {type(d).__name__}")
    return d


def string(d: dict[str, Any], key: str, what: str, *, optional: bool = False) -> str:
    v = d.get(key)
    if optional and (v is None or v == ""):
        return ""
    if not isinstance(v, str) or not v:
        raise SchemaError(f"{what}.{key} must be a non-empty string")
    return v


INT64_MAX = 2**63 - 1  # what SQLite stores, and the fast path's bound: no wire integer is larger


def integer(d: dict[str, Any], key: str, what: str, *, minimum: int | None = None) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise SchemaError(f"{what}.{key} must be an integer")
    if minimum is not None and v < minimum:
        raise SchemaError(f"{what}.{key} must be >= {minimum}, got {v}")
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise SchemaError(f"{what}.{key} must fit in 64 bits, got {v}")
    return v


def number(d: dict[str, Any], key: str, what: str) -> float:
    v = d.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise SchemaError(f"{what}.{key} must be a number")
    return float(v)


def array(d: dict[str, Any], key: str, what: str) -> list[Any]:
    v = d.get(key)
    if not isinstance(v, list):
        raise SchemaError(f"{what}.{key} must be a list")
    return v


def const(d: dict[str, Any], key: str, expected: Any, what: str) -> None:
    if d.get(key) != expected:
        raise SchemaError(f"{what}.{key} must be {expected!r}, got {d.get(key)!r}")
