"""Device tags (``site=north``): what a tag key and value may hold, and the one ``key=value`` parser.

Tags are a contract. ``device-agent provision --tag`` writes them into the device's ``config.toml``; the fleet
server stores them at enrollment (``devices enroll --tag``, ``POST /api/v1/devices``, enrollment tokens) and
reads them back as filters (``GET /api/v1/devices?tag=``, the dashboard's ``tag=``), as rollout cohorts (every
pair must match) and as drift cohorts (``by=site``; alert scopes are written ``site=north``). One rule for all:

* **A tag is written** ``key=value`` **and split at the first** ``=``, so a value may hold ``=``
  (``formula=a=b`` is key ``formula``, value ``a=b``).
* **Key**: 1 to 64 characters, no ``=``. A key holding ``=`` could never be asked for with ``key=value`` (nor
  told apart in an alert scope), so it is refused rather than stored unreachable. Anything else printable is
  a key (``a.b``, ``we"ird``, ``$[0]``: the server matches keys as plain text, never as a JSON path).
* **Value**: 0 to 128 characters; **may be empty**. ``site=`` is the value ``""``, which is not the absence of
  the tag: a rollout cohort ``{"site": ""}`` holds only devices tagged with the empty site, drift puts untagged
  devices under ``(none)``, and the server has stored empty values since tags existed (the lengths 64 and 128
  are the ones it has always enforced at enrollment).
* **Neither holds a control or invisible character** (Unicode categories Cc, Cf, Cs, Zl, Zp: NUL, newline,
  tab, zero-width and bidi controls, line separators). A newline breaks the device's ``config.toml`` and every
  ``key=value`` line a CLI or log prints, and an invisible character makes two tags that look alike differ.
* **Neither begins or ends with whitespace**: ``site`` and ``site `` look the same in every listing but never
  match. Nothing is stripped or otherwise changed: a tag is exact text, refused with the reason rather than
  quietly altered into something else.

Errors are SchemaError naming the tag and the problem; each boundary turns it into its own error (a 422 for
the API, a usage error for a CLI) and adds an example in its own syntax.
"""

from __future__ import annotations

import unicodedata

from .errors import SchemaError

__all__ = ["MAX_KEY_CHARS", "MAX_VALUE_CHARS", "check_tag", "parse_tag"]

MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 128
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHOWN = 80  # characters of a refused tag repeated in the message


def parse_tag(text: str, what: str = "tag") -> tuple[str, str]:
    """``key=value`` -> (key, value), split at the first ``=``, by the rule above.

    ``what`` names the tag in the message (``"tag"``, ``"tag filter"``). Raises SchemaError
    (``"<what> '<text>' <problem>"``) when ``text`` is not a tag.
    """
    key, sep, value = text.partition("=")
    problem = _problem(key, value) if sep else "must look like key=value"
    if problem is not None:
        raise SchemaError(f"{what} {_shown(text)} {problem}")
    return key, value


def check_tag(key: object, value: object, what: str = "tag") -> tuple[str, str]:
    """(key, value) when the pair is a tag by the rule above (for tags that arrive as a mapping, e.g. a JSON
    object at enrollment). Raises SchemaError naming the pair and the problem."""
    if not isinstance(key, str) or not isinstance(value, str):
        raise SchemaError(f"{what} {key!r}: {value!r} must be a string key and a string value")
    problem = _problem(key, value)
    if problem is not None:
        raise SchemaError(f"{what} {_shown(f'{key}={value}')} {problem}")
    return key, value


def _problem(key: str, value: str) -> str | None:
    """What is wrong with the pair, as the end of a sentence about it; None when it is a tag."""
    if not key:
        return "must look like key=value with a non-empty key"
    if "=" in key:
        return "has '=' in its key; a key cannot hold '=' (key=value is split at the first '=')"
    for part, text, limit in (("key", key, MAX_KEY_CHARS), ("value", value, MAX_VALUE_CHARS)):
        if len(text) > limit:  # before the scan below, so a huge query string costs nothing
            return f"has a {len(text)}-character {part}; a {part} is at most {limit} characters"
        bad = next((c for c in text if unicodedata.category(c) in _INVISIBLE), None)
        if bad is not None:
            return (f"has the control or invisible character U+{ord(bad):04X} in its {part}; "
                    "a tag is printable text")
        if text[:1].isspace() or text[-1:].isspace():
            return f"has whitespace at the start or end of its {part}; remove it (nothing is stripped)"
    return None


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")
