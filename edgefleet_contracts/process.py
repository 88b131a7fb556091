"""Process-wide helpers shared by the agent and the server: one process per folder (a pid lock), and log lines said
once per process."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Hashable, Iterator
from pathlib import Path

__all__ = ["LockHeldError", "pid_lock", "warn_once"]


class LockHeldError(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote (or "?")."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by pid {holder}")
        self.holder = holder


@contextlib.contextmanager
def pid_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (made 0600 when missing), with this process's pid written in it,
    for the ``with`` block. The lock dies with the process, so a crash never leaves it held. Raises
    LockHeldError naming the holder's pid when another process has it, OSError when the file cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(os.pread(fd, 32, 0).decode(errors="replace").strip() or "?") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_warned: set[Hashable] = set()
_warned_lock = threading.Lock()


def warn_once(key: Hashable) -> bool:
    """True the first time this process asks about ``key``, False ever after.

    For warnings about something loaded again and again (a device's config.toml by each part of the agent, a
    model's stored alert rules at every evaluation): the operator sees each one once per start of a command, not
    once per load. The only state this module keeps, and only to deduplicate log lines."""
    with _warned_lock:
        if key in _warned:
            return False
        _warned.add(key)
        return True
