"""Small helpers shared by the test packages (fixtures live in each package's conftest)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``folder`` (created) for disk-full tests; unmounted after. Needs root
    (CI runs as root): a failing mount fails the test, it is never skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)], check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True, capture_output=True)


def fill(folder: Path, limit: int = 100_000) -> Path:
    """Write zeros into ``folder/filler`` until the file system says ENOSPC (bounded); returns the filler."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(limit):
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28, exc
    else:
        raise AssertionError(f"{folder} never filled up")
    finally:
        os.close(fd)
    return filler


def expired_token(store: Any, role: str, name: str = "expired") -> str:
    """A bearer token of ``role`` whose lifetime has run out (a token cannot be made with none: ``create_token``
    refuses a lifetime under 1 s)."""
    from fleet_server.auth import create_token

    token = create_token(store, role, name=name, ttl_seconds=1)
    with store.write() as c:
        c.execute("UPDATE tokens SET expires = created - 1 WHERE name = ?", (name,))
    return token
