"""Watching a version on probation to its verdict, and ending the probation with it (the converge worker's
probation steps; the judging itself is :class:`device_agent.probation.ProbationWatch`).

A newer accepted desired state that names the previous version ends the watch at once with a rollback
(``desired_rollback``). Ending the probation waits a bounded time for the update lock.

The counts are in memory and looked at every ``poll`` seconds; what is on disk (the slot's smoke test, the update
record: someone else may end the probation, and desired.json) is read at most once every ``files_every`` seconds,
and desired.json also at once when ``wake`` is set (the handler sets it for every received desired state). A
fleet simulator runs hundreds of these watches in one process: reading five files ten times a second each kept
its threads queueing for the interpreter lock and slowed every install there.
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
          reload_agent: Callable[[], None], accepted: Callable[[], Desired | None],
          wake: threading.Event | None = None, files_every: float = 1.0) -> Verdict | None:
    """Watch until a verdict; None when the handler stops or someone else ended the probation.

    ``accepted`` returns the accepted desired state now (None when there is none or it cannot be read);
    ``reload_agent`` makes the agent load the active slot when it does not serve the candidate yet; ``wake``
    (cleared here) cuts a wait short: a desired state arrived, or the handler stops (it sets ``stop`` first)."""

    def read() -> StatsSnapshot:
        return agent.version_stats(name, version) if agent is not None else StatsSnapshot()

    def serving() -> bool:
        m = agent.model if agent is not None else None
        return agent is None or (m is not None and (m.name, m.version) == (name, version))

    smoke_ok: list[Any] = [None, 0.0]  # the last smoke check and when it is due again

    def smoke() -> bool:
        if time.monotonic() >= smoke_ok[1]:
            smoke_ok[:] = [up.slots.is_ready(slot), time.monotonic() + files_every]
        return bool(smoke_ok[0])

    watcher = ProbationWatch(policy, baseline, read, serving=serving, smoke=smoke)
    previous = cand.get("previous") or {}
    next_reload = next_files = 0.0
    woken = True
    while True:
        if stop.is_set():
            return None
        if not serving() and time.monotonic() >= next_reload:
            reload_agent()
            next_reload = time.monotonic() + 1.0
        verdict = watcher.poll()
        if verdict.outcome != "watch":
            return verdict
        files = time.monotonic() >= next_files
        if files or woken:
            asked = asks_for_previous(accepted(), previous, cand.get("seq"))
            if asked is not None:
                return Verdict("fail", "desired_rollback", f"desired state seq {asked.seq} asks for {asked.name} "
                               f"{asked.version}" + (f" ({asked.reason})" if asked.reason else "")
                               + f"; probation of {name} {version} ended", verdict.details)
        if files:
            if up.record().state != UpdateState.PROBATION:
                return None
            next_files = time.monotonic() + files_every
        if wake is None:
            stop.wait(poll)
            woken = False
        else:
            woken = wake.wait(poll)
            wake.clear()


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
