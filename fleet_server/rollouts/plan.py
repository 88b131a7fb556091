"""Which devices a rollout stage covers: stable hashing of device ids within the cohort.

A device's position is ``sha256("<model>:<device id>")`` mapped to [0, 100). Stage k (a cumulative percentage)
covers the cohort devices whose position is below it, so the same devices are the canaries for every rollout of
a model (predictable for operators), stages only ever grow, and a device that joins the cohort mid-rollout is
placed by the same rule. A non-empty cohort always gets at least one device in the first stage: the device with
the lowest position is included even when 1% of the cohort rounds to nobody.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping


def position(model: str, device_id: str) -> float:
    h = hashlib.sha256(f"{model}:{device_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 * 100.0


def in_cohort(tags: Mapping[str, str], cohort: Mapping[str, str]) -> bool:
    return all(tags.get(k) == v for k, v in cohort.items())


def stage_devices(model: str, devices: Iterable[tuple[str, Mapping[str, str]]], cohort: Mapping[str, str],
                  percent: float) -> list[str]:
    """Device ids covered by a stage at ``percent`` (cumulative) of the cohort, ordered by position."""
    members = sorted((position(model, d), d) for d, tags in devices if in_cohort(tags, cohort))
    chosen = [d for p, d in members if p < percent]
    if not chosen and members and percent > 0:
        chosen = [members[0][1]]
    return chosen


def parse_stages(text: str, name: str = "stages") -> list[float]:
    """'1,10,50,100' -> [1.0, 10.0, 50.0, 100.0]; raises ValueError (naming ``name``) unless strictly increasing
    percentages in (0, 100]."""
    try:
        stages = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(_STAGES_RULE.format(name=name, shown=repr(text))) from None
    return check_stages(stages, name, repr(text))


def check_stages(stages: list[float], name: str = "stages", shown: str | None = None) -> list[float]:
    """``stages`` as floats when they are strictly increasing percentages in (0, 100]; else ValueError naming
    ``name`` and showing ``shown`` (by default the list)."""
    if not stages or any(not 0 < s <= 100 for s in stages) or any(b <= a for a, b in zip(stages, stages[1:],
                                                                                           strict=False)):
        raise ValueError(_STAGES_RULE.format(name=name, shown=shown or repr(stages)))
    return [float(s) for s in stages]


_STAGES_RULE = "{name} {shown} must be increasing percentages in (0, 100], e.g. 1,10,50,100"
