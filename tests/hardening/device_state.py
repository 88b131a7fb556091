"""What must not change on a device when an attack is refused, captured before and compared after.

``Snapshot`` holds the bytes of the trust store files (pinned keys and trust.json), the active pointer, the
slot tree (names and sizes), the last accepted desired-state seq and the agent's counters. ``still_serving``
runs a real prediction through ``Agent.predict`` and returns the version that answered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.config import DeviceDir

TRUST_FILES = ("trust.json", "keys/root.pub", "keys/fleet.pub")


def rows(built: Any) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"], dtype=np.float32)


def trust_bytes(dev: DeviceDir) -> dict[str, bytes]:
    return {name: (dev.path / name).read_bytes() for name in TRUST_FILES}


def trust_doc(dev: DeviceDir) -> dict[str, Any]:
    return json.loads(dev.trust_file.read_text())


def _counters(agent: Agent) -> dict[str, Any]:
    s = agent.status()
    return {k: s[k] for k in ("model", "predictions", "rejected", "feedback", "windows_closed")}


@dataclass(frozen=True)
class Snapshot:
    trust: dict[str, bytes]
    active: bytes
    slots: list[tuple[str, int]]
    desired_seq: int
    counters: dict[str, Any]

    @classmethod
    def take(cls, dev: DeviceDir, agent: Agent) -> Snapshot:
        from device_agent.desired_handler import read_desired_seq

        slots = sorted((str(p.relative_to(dev.slots)), p.stat().st_size) for p in dev.slots.rglob("*"))
        return cls(trust_bytes(dev), dev.active_file.read_bytes(), slots, read_desired_seq(dev), _counters(agent))

    def diff(self, other: Snapshot) -> list[str]:
        """The names of what differs (empty when nothing does)."""
        out = [f"trust store file {k}" for k in TRUST_FILES if self.trust[k] != other.trust[k]]
        for name in ("active", "slots", "desired_seq", "counters"):
            if getattr(self, name) != getattr(other, name):
                out.append(name)
        return out


def still_serving(agent: Agent, x: np.ndarray) -> str:
    """Reload the agent as the running one would after any install attempt, then predict one real row."""
    agent.reload()
    return agent.predict(x).version


def unchanged_after(dev: DeviceDir, agent: Agent, before: Snapshot, x: np.ndarray, version: str,
                    allow: tuple[str, ...] = ()) -> None:
    """Assert the device is as ``before`` (except what ``allow`` names) and still answers with ``version``.

    The check predicts once, so the ``before`` counters are compared first, then the answer."""
    after = Snapshot.take(dev, agent)
    changed = [d for d in before.diff(after) if d not in allow]
    assert changed == [], f"changed by a refused attack: {changed}"
    assert still_serving(agent, x) == version
    assert agent.status()["predictions"] == before.counters["predictions"] + 1
