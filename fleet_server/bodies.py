"""Reading fields of a JSON request body: each getter checks the type (and range) and raises RequestError (422)
naming the field, so a wrong type is a clear refusal and never a 500 from a ``float()``, ``dict()`` or
``.items()`` deeper down. :func:`known_fields` refuses a field the route does not read, so a misspelled optional
field (``bake`` for ``bake_seconds``) is a 422 rather than its default applied unnoticed."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from .errors import RequestError, named_unknown

__all__ = ["body_object", "boolean", "floats", "integer", "integers", "known_fields", "number", "string", "strings"]

_INT_MAX = 2**63 - 1  # what SQLite stores


def body_object(b: Any, shape: str) -> dict[str, Any]:
    """The body as an object; ``shape`` describes it in the error (e.g. ``{model, version, stages?}``)."""
    if not isinstance(b, dict):
        raise RequestError(f"body must be a JSON object {shape}")
    return b


def known_fields(b: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """``b`` when each of its fields is one of ``fields``; else RequestError naming the unknown ones (each with
    the nearest known field, if one is close) and listing ``fields``."""
    unknown = [str(k) for k in b if k not in fields]
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {named_unknown(unknown, fields, _nearest)};"
                           f" the fields are {', '.join(fields)}")
    return b


def _nearest(word: str, fields: Sequence[str]) -> list[str]:
    """The known field ``word`` most likely meant: one it begins (``bake`` for ``bake_seconds``), else the closest
    spelling (``max-per-minute`` for ``max_per_minute``), else none."""
    begun = [f for f in fields if word and f.startswith(word)]
    return begun[:1] or difflib.get_close_matches(word.replace("-", "_"), fields, 1)


def string(b: dict[str, Any], key: str, default: str | None = None) -> str:
    v = b.get(key, default)
    if not isinstance(v, str):
        raise RequestError(f"{key} must be a string" if key in b else f"{key} is required")
    return v


def boolean(b: dict[str, Any], key: str, default: bool = False) -> bool:
    """``true`` or ``false`` (absent or null: ``default``). Nothing else: ``"false"`` is a non-empty string,
    which a ``bool()`` would take for true."""
    v = b.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{key} must be true or false, not {v!r}")
    return v


def number(b: dict[str, Any], key: str, default: float, *, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (booleans are refused)."""
    v = b.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(f"{key} must be a number from {lo:g} to {hi:g}, not {v!r}")
    return float(v)


def integer(b: dict[str, Any], key: str, default: int, *, lo: int = 0, hi: int = _INT_MAX) -> int:
    v = b.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"{key} must be a whole number from {lo} to {hi}, not {v!r}")
    return v


def strings(b: dict[str, Any], key: str) -> dict[str, str]:
    """An object of string -> string (absent or null: empty)."""
    v = b.get(key) or {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise RequestError(f"{key} must be an object of string values, like {{\"site\": \"north\"}}")
    return v


def floats(b: dict[str, Any], key: str) -> dict[str, float]:
    """An object of string -> finite number (absent or null: empty)."""
    v = b.get(key) or {}
    if not isinstance(v, dict):
        raise RequestError(f"{key} must be an object of numbers")
    return {k: number(v, k, 0.0, lo=-1e300, hi=1e300) for k in v}


def integers(b: dict[str, Any], key: str, *, lo: int, hi: int) -> list[int]:
    """A list of whole numbers in [lo, hi] (absent or null: empty)."""
    v = b.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
                                          for x in v):
        raise RequestError(f"{key} must be a list of whole numbers from {lo} to {hi}")
    return list(v)
