"""Small helpers shared by the test packages (fixtures live in each package's conftest)."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable

from fleet_server.cli import main as fleet_cli


def cli(argv: list[str]) -> str:
    """Run ``fleet-server ARGV`` in-process; its stdout. Fails the test (with stderr) when it exits non-zero."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fleet_cli(argv)
    assert rc == 0, f"fleet-server {' '.join(argv)} failed: {err.getvalue()}"
    return out.getvalue()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (bounded); its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
