"""Watching a version on probation to its verdict, and ending the probation with it (the converge worker's
probation steps; the judging itself is :class:`device_agent.probation.ProbationWatch`).

A newer accepted desired state that names the previous version ends the watch at once with a rollback
(``desired_rollback``). Ending the probation waits a bounded time for the update lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet_contracts.desired import Desired

from ..probation import Baseline, ProbationPolicy, ProbationWatch, StatsSnapshot, Verdict
from ..slots import BusyError
from ..updater import InstallResult, Updater, UpdateState

if TYPE_CHECKING:
    from ..agent import Agent

log = logging.getLogger("device_agent.desired_handler")  # the handler's one logger, as before the split


def watch(up: Updater, agent: Agent | None, policy: ProbationPolicy, baseline: Baseline | None, name: str,
          version: str, slot: str, cand: dict[str, Any], *, stop: threading.Event, poll: float,
          reload_agent: Callable[[], None], accepted: Callable[[], Desired | None]) -> Verdict | None:
    """Watch until a verdict; None when the handler stops or someone else ended the probation.

    ``accepted`` returns the accepted desired state now (None when there is none or it cannot be read);
    ``reload_agent`` makes the agent load the active slot when it does not serve the candidate yet."""

    def read() -> StatsSnapshot:
        return agent.version_stats(name, version) if agent is not None else StatsSnapshot()

    def serving() -> bool:
        m = agent.model if agent is not None else None
        return agent is None or (m is not None and (m.name, m.version) == (name, version))

    watcher = ProbationWatch(policy, baseline, read, serving=serving, smoke=lambda: up.slots.is_ready(slot))
    previous = cand.get("previous") or {}
    next_reload = 0.0
    while True:
        if stop.is_set():
            return None
        if not serving() and time.monotonic() >= next_reload:
            reload_agent()
            next_reload = time.monotonic() + 1.0
        verdict = watcher.poll()
        if verdict.outcome != "watch":
            return verdict
        asked = asks_for_previous(accepted(), previous, cand.get("seq"))
        if asked is not None:
            return Verdict("fail", "desired_rollback", f"desired state seq {asked.seq} asks for {asked.name} "
                           f"{asked.version}" + (f" ({asked.reason})" if asked.reason else "")
                           + f"; probation of {name} {version} ended", verdict.details)
        if up.record().state != UpdateState.PROBATION:
            return None
        stop.wait(poll)


def asks_for_previous(d: Desired | None, previous: dict[str, Any], seq: Any) -> Desired | None:
    """``d`` when it is newer than desired seq ``seq`` (the one that installed the candidate) and names the
    ``previous`` version; else None. Pure."""
    if d is None or not isinstance(seq, int) or d.seq <= seq:
        return None
    return d if (d.name, d.version) == (previous.get("name"), previous.get("version")) else None


def finish(up: Updater, verdict: Verdict, expect: tuple[str, str], *, stop: threading.Event, retry_initial: float,
           retry_max: float) -> InstallResult | None:
    """Commit or roll back the probation of ``expect`` (name, version) by ``verdict``; None when someone else
    ended it, or when the update lock stays busy past ``max(30 s, retry_max)`` or ``stop`` is set."""
    deadline = time.monotonic() + max(30.0, retry_max)
    while True:
        try:
            result = up.finish_probation(verdict.outcome == "pass", verdict.reason, verdict.message,
                                         verdict.details, expect=expect)
        except BusyError:
            if time.monotonic() > deadline or stop.wait(retry_initial):
                return None
            continue
        if result is not None:
            level = logging.INFO if result.status == "committed" else logging.WARNING
            log.log(level, "probation of %s %s: %s (%s): %s", expect[0], expect[1], result.status, result.reason,
                    result.message)
        return result
