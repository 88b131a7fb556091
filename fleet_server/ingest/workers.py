"""Validator processes: validation is pure Python holding the GIL, so a second core needs a second process."""

from __future__ import annotations

import collections
import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..settings import ServerSettings
from ..store import Store
from .results import Outcome, Submission
from .validation import Validator

__all__ = ["Item", "ValidatorProcess"]

# One message handed to ingest: (kind, payload, topic device, source, completion callback).
Item = tuple[str, bytes, str | None, str, Callable[[Outcome], None] | None]


class ValidatorProcess:
    """One spawned validator process (never forked: the server has threads) with its own pipe.

    Each process has its own pipe, so a process that dies is seen at once as EOF on exactly that pipe, even
    mid-message (concurrent.futures' shared result queue can block forever on a half-written result of a
    killed worker). Batches are answered in order; a reader thread hands each answer to ``on_done``, and when
    the process dies, each batch it held with ``subs`` None (an empty batch when it held none).
    """

    def __init__(self, settings: ServerSettings,
                 on_done: Callable[[ValidatorProcess, list[Item], list[Submission] | None, str | None], None],
                 timeout: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, settings, os.getpid()),
                                   name="ingest-validator", daemon=True)
        self.process.start()
        child.close()  # only the worker holds its end now: its death is EOF here
        self._on_done = on_done
        self._lock = threading.Lock()
        self._pending: collections.deque[list[Item]] = collections.deque()
        self.alive = True
        self._closing = False  # set by close(): the exit that follows is asked for, not a failure
        try:
            ready = self._conn.poll(timeout) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise RuntimeError(f"validator process {self.pid} did not start within {timeout:g} s")
        self._reader = threading.Thread(target=self._read, name=f"ingest-validator-{self.pid}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._pending)

    def send(self, batch: list[Item], over_rate: frozenset[str]) -> bool:
        """Queue a batch (called by the one dispatcher thread). False when the process is gone; if it dies
        after this, ``on_done`` gets the batch back with an error."""
        work = [(kind, payload, topic_device, source) for kind, payload, topic_device, source, _ in batch]
        with self._lock:
            if not self.alive:
                return False
            self._pending.append(batch)
        # Not under the lock: the reader must keep draining answers. If it died, the reader sees EOF and
        # returns every pending batch, this one included.
        with contextlib.suppress(OSError, ValueError):
            self._conn.send((work, over_rate))
        return True

    def _read(self) -> None:
        error = "exited"
        while True:
            try:
                subs = self._conn.recv()
            except (EOFError, OSError) as exc:
                error = f"exited ({type(exc).__name__})"
                break
            with self._lock:
                batch = self._pending.popleft()
            self._on_done(self, batch, subs, None)
        with self._lock:
            self.alive = False
            left = list(self._pending)
            self._pending.clear()
        # At least once, so the owner learns of the death (and replaces the process) even when it died idle,
        # holding no batch; but an exit that close() asked for, holding nothing, is no death to report.
        if not left and self._closing:
            return
        for batch in left or [[]]:
            self._on_done(self, batch, None, f"validator process {self.pid} {error}")

    def close(self, timeout: float) -> bool:
        """Ask the process to exit (after the batches it holds), wait (bounded), else kill it by PID."""
        self._closing = True
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self.process.join(timeout)
        clean = not self.process.is_alive()
        self._kill()
        self._reader.join(2.0)
        self._conn.close()
        return clean

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)


def _worker_main(conn: Any, settings: ServerSettings, parent: int) -> None:
    """A validator process: answers each batch of messages with their Submissions, in order."""
    # The server owns this process's life: it asks it to exit (close), kills it by PID past a timeout, and the
    # orphan watch below ends it if the server dies. Ctrl-C (SIGINT) and a stop sent to the whole process group
    # (SIGTERM from `timeout`, or systemd's default KillMode=control-group) reach this process too; dying of them
    # first made a clean stop look like a crashed validator (and started a replacement mid-stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def orphan_watch() -> None:  # a SIGKILLed server closes no pipe we would notice while busy: do not linger
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()
    validator = Validator(settings, Store(settings.db_path))
    # A batch's documents are acyclic and die with the batch (reference counting frees them); the cyclic
    # collector's frequent passes over everything allocated found nothing to free here. Collect rarely.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    conn.send("ready")
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            work, over_rate = msg
            conn.send(validator.check_batch(work, over_rate))
    finally:
        validator.store.close()  # its read connection, before the server closes its own (which checkpoints)
