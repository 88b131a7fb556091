"""The daily UTC window shared by a device's maintenance window and a rollout's --window."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edgefleet_contracts.timeutil import DailyWindow
from fleet_server.rollouts.engine import in_window


def at(hh: int, mm: int) -> datetime:
    return datetime(2026, 1, 1, hh, mm, tzinfo=UTC)


def test_a_window_that_wraps_midnight() -> None:
    w = DailyWindow.parse("23:00-02:00")
    assert w.is_open(at(23, 30)) and w.is_open(at(1, 59)) and not w.is_open(at(2, 0)) and not w.is_open(at(12, 0))
    assert w.seconds_until_open(at(22, 0)) == 3600 and w.seconds_until_open(at(0, 10)) == 0
    assert in_window("23:00-02:00", at(1, 0).timestamp()) and not in_window("23:00-02:00", at(3, 0).timestamp())
    assert in_window("", at(3, 0).timestamp())


@pytest.mark.parametrize("bad", ["2-4", "02:00", "02:00-02:00", "25:00-01:00", "cron(0 2 * * *)"])
def test_a_bad_window_names_itself(bad: str) -> None:
    with pytest.raises(ValueError, match="window"):
        DailyWindow.parse(bad)
