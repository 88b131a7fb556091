"""Flush requests between processes sharing a prediction log folder (``device-agent serve``'s workers).

A prediction another process made sits in that process's memory for up to a second or two (staged rows, then its
log's queue) before it reaches a segment on disk. A process that ``listen``s answers flush requests on a Linux
abstract Unix socket named after the folder and its boot; ``ask`` sends one and waits for the answer. A process
that does not answer (gone, or not listening) holds nothing more on disk: the caller treats the id as unknown.
Nothing here is on the hot path: requests are made only by ``PredictionLog.lookup`` (feedback).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["FlushPeers"]

log = logging.getLogger("edgefleet.agent")


class FlushPeers:
    """The flush-request endpoint of one prediction log (``directory``): ``flush`` writes its records out;
    ``stop`` ends the listener (checked every half second)."""

    def __init__(self, directory: Path, flush: Callable[[], None], stop: threading.Event) -> None:
        self.dir = directory
        self._flush = flush
        self._stop = stop
        self._server: socket.socket | None = None
        self._before_flush: Callable[[], None] | None = None

    def _name(self, boot: str) -> str:
        digest = hashlib.sha256(f"{self.dir.resolve()}\0{boot}".encode()).hexdigest()[:40]
        return f"\0edgefleet-predlog-{digest}"

    def listen(self, boot: str, before_flush: Callable[[], None] | None = None) -> bool:
        """Answer flush requests for ``boot``; ``before_flush`` runs first on each (the agent hands over its
        staged rows). False (and a warning) where it cannot listen (not Linux: no abstract sockets): then another
        process sees this one's predictions only after its periodic flush."""
        self._before_flush = before_flush
        if self._server is not None:
            return True
        if not sys.platform.startswith("linux"):
            log.warning("prediction log: flush requests need Linux abstract sockets; not listening")
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._name(boot))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            log.warning("prediction log: cannot listen for flush requests (%s)", exc)
            return False
        sock.settimeout(0.5)  # accept wakes to see the stop flag
        self._server = sock
        threading.Thread(target=self._serve, args=(sock,), name="prediction-log-share", daemon=True).start()
        return True

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.wait(0.1):
                    break
                continue
            with conn:
                try:
                    conn.settimeout(5)
                    if not conn.recv(16).startswith(b"flush"):
                        continue
                    if self._before_flush is not None:
                        self._before_flush()
                    self._flush()
                    conn.sendall(b"ok\n")
                except OSError:
                    pass
                except Exception:  # never end the listener over a bug: logged, the asker sees no answer
                    log.exception("prediction log: a flush request failed")
        sock.close()

    def ask(self, boot: str, timeout: float = 5.0) -> bool:
        """Ask the process whose boot is ``boot`` to write its predictions out; True once it says it has."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self._name(boot))
                s.sendall(b"flush\n")
                return s.recv(16).startswith(b"ok")
        except OSError:
            return False  # no such process any more (or it is stuck): what it held is not on disk
