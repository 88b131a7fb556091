"""What a rollout is started with, checked in one place for every caller: ``fleet-server rollout start`` (flags),
``POST /api/v1/rollouts`` (a JSON body) and Python callers of ``service.start``.

:func:`check` takes the values as they arrived (JSON values from the API, already split flag values from the
CLI) and checks type and range together, so the CLI and the API refuse the same values with the same words; only
the name of the parameter differs, taken from ``names``: :data:`BODY` (the body's field names) or :data:`FLAGS`
(the CLI's flags). A refusal is a RequestError (a 422 from the API, exit status 1 from the CLI) naming the
parameter, the rule and the value.

Decisions:

* ``approve_stages`` are 1-based stage numbers from 1 to the number of stages (duplicates are one). Stage 1 is
  allowed and means what it says: the rollout is created ``awaiting_approval`` and moves no device until an
  operator approves it (``rollout approve ID``), as a later stage waits after the one before it passed its gates.
* ``max_per_minute`` is a whole number from 0 (no limit) to 1,000,000,000; ``bake_seconds`` is from 0 to 365
  days (the longest bake summary retention is sized for, see README "Storage and retention").
* ``thresholds`` are overrides of known gate thresholds (``gates.DEFAULT_THRESHOLDS``), each a finite number.
* ``window`` is ``""`` (any time) or a daily UTC window ``HH:MM-HH:MM`` (``DailyWindow``, the agent's rule).
* ``cohort`` is an object of tags, each pair held to the tag contract (:mod:`edgefleet_contracts.tags`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet_contracts.timeutil import DailyWindow

from ..devices import check_tags
from ..errors import RequestError, named_unknown
from .gates import DEFAULT_THRESHOLDS
from .plan import check_stages, parse_stages

__all__ = ["BODY", "FLAGS", "MAX_BAKE_SECONDS", "MAX_PER_MINUTE", "START_FIELDS", "RolloutParams", "check",
           "check_cohort"]

MAX_BAKE_SECONDS = 365 * 86400
MAX_PER_MINUTE = 10**9

# How each caller names the checked parameters in its errors.
BODY: Mapping[str, str] = {k: k for k in ("cohort", "stages", "bake_seconds", "max_per_minute", "window",
                                           "thresholds", "approve_stages")}
FLAGS: Mapping[str, str] = {"cohort": "--cohort", "stages": "--stages", "bake_seconds": "--bake",
                            "max_per_minute": "--max-per-minute", "window": "--window", "thresholds": "--gate",
                            "approve_stages": "--approve"}
# The fields of a POST /api/v1/rollouts body: any other is refused (a misspelled field must not fall back to
# its default unnoticed).
START_FIELDS: tuple[str, ...] = ("model", "version", *BODY)


@dataclass(frozen=True)
class RolloutParams:
    """Checked parameters of a rollout (see :func:`check`)."""

    cohort: dict[str, str]
    stages: list[float]
    bake_seconds: float
    max_per_minute: int
    window: str
    thresholds: dict[str, float]
    approve_stages: list[int]  # 1-based, sorted, each once


def check(*, cohort: Any, stages: Any, bake_seconds: Any, max_per_minute: Any = 0, window: Any = "",
          thresholds: Any = None, approve_stages: Any = None, names: Mapping[str, str] = BODY) -> RolloutParams:
    """The parameters, checked by the rules in the module docstring. ``stages`` is text (``"1,10,50,100"``) or a
    list of cumulative percentages. Raises RequestError naming the parameter as ``names`` spells it."""
    stage_list = _stages(stages, names["stages"])
    return RolloutParams(
        cohort=check_cohort(cohort, names["cohort"]),
        stages=stage_list,
        bake_seconds=_bake(bake_seconds, names["bake_seconds"]),
        max_per_minute=_per_minute(max_per_minute, names["max_per_minute"]),
        window=_window(window, names["window"]),
        thresholds=_thresholds(thresholds, names["thresholds"]),
        approve_stages=_approve(approve_stages, len(stage_list), names["approve_stages"]),
    )


def check_cohort(cohort: Any, name: str = "cohort") -> dict[str, str]:
    """An object of tags (absent or null: the whole fleet). RequestError naming ``name`` and the bad pair."""
    return {} if cohort is None else check_tags(cohort, name, name)


def _stages(stages: Any, name: str) -> list[float]:
    try:
        if isinstance(stages, str):
            return parse_stages(stages, name)
        if isinstance(stages, list | tuple) and all(_is_number(s) for s in stages):
            return check_stages(list(stages), name)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    raise RequestError(f"{name} must be cumulative percentages such as 1,10,50,100, not {stages!r}")


def _bake(v: Any, name: str) -> float:
    if not _is_number(v) or not 0 <= v <= MAX_BAKE_SECONDS:
        raise RequestError(f"{name} must be from 0 s to 365 days ({MAX_BAKE_SECONDS:,} s), not {_seconds(v)}")
    return float(v)


def _per_minute(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_PER_MINUTE:
        raise RequestError(f"{name} must be a whole number of devices from 0 (no limit) to {MAX_PER_MINUTE:,}, "
                           f"not {v!r}")
    return v


def _window(v: Any, name: str) -> str:
    if v is None or v == "":
        return ""
    if not isinstance(v, str):
        raise RequestError(f"{name} must be a daily UTC window HH:MM-HH:MM such as 02:00-04:00, not {v!r}")
    try:
        DailyWindow.parse(v)
    except ValueError:
        raise RequestError(f"{name} {v!r} must be a daily UTC window HH:MM-HH:MM with different ends, such as "
                           "02:00-04:00") from None
    return v


def _thresholds(v: Any, name: str) -> dict[str, float]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise RequestError(f"{name} must be an object of gate thresholds such as {{\"max_error_rate\": 0.02}}, "
                           f"not {v!r}")
    known = sorted(DEFAULT_THRESHOLDS)
    unknown = [str(k) for k in v if k not in DEFAULT_THRESHOLDS]
    if unknown:
        raise RequestError(f"{name}: unknown gate threshold{'s' if len(unknown) > 1 else ''} "
                           f"{named_unknown(unknown, known)}; "
                           f"the thresholds are {', '.join(known)}")
    out: dict[str, float] = {}
    for k, x in v.items():
        low, high, what = _THRESHOLD_RANGES.get(k, (0.0, math.inf, "a finite number, 0 or more"))
        if not _is_number(x) or not low <= x <= high or (k == "max_p95_latency_ratio" and x == 0):
            raise RequestError(f"{name} {k} must be {what}, not {x!r}")
        out[k] = float(x)
    return out


# (lowest, highest, in words) per threshold; any other is a finite number, 0 or more. A negative rate would fail
# every stage, a rate over 1 would pass every one: both are typos, refused by name.
_THRESHOLD_RANGES: dict[str, tuple[float, float, str]] = {
    "min_devices": (1, math.inf, "a number of devices, 1 or more"),
    "max_install_failure_rate": (0, 1, "a rate from 0 to 1"),
    "max_error_rate": (0, 1, "a rate from 0 to 1"),
    "max_accuracy_drop": (0, 1, "an accuracy difference from 0 to 1"),
    "max_p95_latency_ratio": (0, math.inf, "a ratio over 0 (new p95 / control p95)"),
}


def _approve(v: Any, n: int, name: str) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, list | tuple) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise RequestError(f"{name} must be a list of stage numbers (1 to {n}), not {v!r}")
    bad = [x for x in v if not 1 <= x <= n]
    if bad:
        raise RequestError(f"{name} {', '.join(map(str, bad))}: this rollout has {n} stage{'s' if n > 1 else ''}, "
                           f"numbered 1 to {n}")
    return sorted(set(v))


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _seconds(v: Any) -> str:
    if not _is_number(v):
        return repr(v)
    whole = f"{int(v):,}" if float(v).is_integer() else f"{v:g}"
    return f"{whole} s" + (f" ({v / 86400:g} days)" if abs(v) >= 86400 else "")
