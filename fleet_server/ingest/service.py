"""The ingest service: sources (the MQTT subscriber) -> validators (threads or processes) -> rate tokens ->
the writer -> completion callbacks (MQTT acknowledgement, HTTP answer)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from ..settings import ServerSettings
from ..store import Store
from .counters import IngestCounters
from .results import Outcome, Submission
from .validation import Validator
from .workers import Item, ValidatorProcess
from .writer import IngestWriter

__all__ = ["IngestService", "IngestSource"]

log = logging.getLogger(__name__)


class IngestSource:
    """What a message source (the MQTT subscriber) offers the service: bounded start, pause, stop."""

    def start(self, timeout: float) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def pause(self) -> None:  # pragma: no cover - interface
        """Stop handing over new messages (unacknowledged ones are delivered again later)."""
        raise NotImplementedError

    def stop(self, timeout: float) -> bool:  # pragma: no cover - interface
        """Send what is owed (acknowledgements of committed messages), then disconnect."""
        raise NotImplementedError


_DISPATCH_MAX = 16  # messages per round trip to a validator process
_DISPATCH_BYTES = 1024 * 1024


class IngestService:
    """Validators + the writer (+ sources such as the MQTT subscriber), started and stopped together.

    ``submit()`` never blocks. Validation (stage one: JSON, schema, signature, look-ups) runs either on
    ``validator_threads`` threads, or, with ``validator_processes > 0``, in that many worker processes: the
    checks are pure Python and hold the GIL (only the signature check releases it), so threads cannot use a
    second core, processes can (``bench/ingest.py``: 2 processes stored ~1.3-1.6x what 2 threads did here). Rate tokens
    are then taken here (stage two), the writer commits, and ``done`` runs. Injected clocks apply to
    thread validation only (worker processes use the system clock). A validator process that dies (OOM
    killer) is replaced; the messages it held are validated here instead, so none is lost.
    """

    def __init__(self, settings: ServerSettings, store: Store, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, validator_threads: int = 1,
                 validator_processes: int = 0) -> None:
        self.settings = settings
        self.store = store
        self.counters = IngestCounters()
        self.validator = Validator(settings, store, clock=clock, monotonic=monotonic)
        self.writer = IngestWriter(settings, store, counters=self.counters)
        self.sources: list[IngestSource] = []
        self._n_threads = max(1, validator_threads)
        self._n_processes = max(0, validator_processes)
        self._workers: list[ValidatorProcess] = []
        self._room = threading.Condition()  # guards _workers; notified when a worker finishes a batch
        self._inbox: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepting = False
        self._inbox_depth = 0

    def add_source(self, source: IngestSource) -> None:
        self.sources.append(source)

    @property
    def running(self) -> bool:
        return self._accepting

    def start(self, timeout: float = 10.0, source_wait: float | None = None) -> bool:
        """Start the writer and validators, then the sources; returns whether every source came up within
        ``source_wait`` seconds (default ``timeout``; a source that did not keeps trying in the background).
        Raises RuntimeError when a validator process cannot start within ``timeout``."""
        with self._lock:
            if self._accepting:
                return True
            self.writer.start()
            if self._n_processes:
                with self._room:
                    self._workers = [self._spawn(timeout) for _ in range(self._n_processes)]
                self._threads = [threading.Thread(target=self._dispatch_loop, name="ingest-dispatch", daemon=True)]
            else:
                self._threads = [threading.Thread(target=self._validate_loop, name=f"ingest-validate-{i}",
                                                  daemon=True) for i in range(self._n_threads)]
            for t in self._threads:
                t.start()
            self._accepting = True
        wait = timeout if source_wait is None else source_wait
        return all([s.start(wait) for s in self.sources])

    def worker_pids(self) -> list[int]:
        """PIDs of the live validator processes (empty in thread mode)."""
        with self._room:
            return [w.pid for w in self._workers if w.alive]

    def submit(self, kind: str, payload: bytes, *, topic_device: str | None, source: str,
               done: Callable[[Outcome], None] | None = None) -> None:
        """Hand a message over (thread-safe, never blocks). ``done(outcome)`` runs after its commit."""
        with self._lock:
            accepting = self._accepting
            if accepting:
                self._inbox_depth += 1
        if not accepting:
            if done is not None:
                done(Outcome(error="ingest is not running"))
            return
        self._inbox.put((kind, payload, topic_device, source, done))

    def _validate_loop(self) -> None:
        """Thread mode: validate what has arrived (up to ``_DISPATCH_MAX`` messages, one batch of look-ups)
        here, then hand it over to the writer."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            batch, stop = self._drain(item, _DISPATCH_MAX)
            subs = self.validator.check_batch([(k, p, td, s) for k, p, td, s, _ in batch],
                                              self.validator.limiter.over_rate())
            for it, sub in zip(batch, subs, strict=True):
                self._finish(it, sub)
            if stop:
                return

    def _drain(self, first: Item, most: int, max_bytes: int | None = None) -> tuple[list[Item], bool]:
        """``first`` and what else is already waiting, up to ``most`` messages (and ``max_bytes`` of payload);
        True as the second value when the stop marker was met (the caller finishes the batch, then returns)."""
        batch, size = [first], len(first[1])
        while len(batch) < most and (max_bytes is None or size < max_bytes):
            try:
                nxt = self._inbox.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
            size += len(nxt[1])
        return batch, False

    def _finish(self, item: Item, sub: Submission | None) -> None:
        """Stage two: take rate tokens, attach the callback, queue for the writer. Validates first when
        stage one has not run (``sub`` None)."""
        kind, payload, topic_device, source, done = item
        if sub is None:
            sub = self.validator.check(kind, payload, topic_device=topic_device, source=source,
                                       over_rate=self.validator.limiter.over_rate())
        sub.resolve(payload)
        sub.done = done
        self.writer.submit(self.validator.admit_submission(sub))
        with self._lock:
            self._inbox_depth -= 1

    # ---- process mode -----------------------------------------------------------------------------------
    def _spawn(self, timeout: float) -> ValidatorProcess:
        return ValidatorProcess(self.settings, self._validated, timeout)

    def _dispatch_loop(self) -> None:
        """Send messages to the validator processes in small batches (one round trip per batch, not per
        message), to the least busy process, keeping at most two batches queued per process so that the
        next batch grows while they work."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            worker = self._idle_worker()
            want = max(1, min(_DISPATCH_MAX, (self._inbox.qsize() + 1) // max(1, self._n_processes)))
            batch, stop = self._drain(item, want, _DISPATCH_BYTES)
            if worker is None or not worker.send(batch, self.validator.limiter.over_rate()):
                for it in batch:  # no live validator process (or it just died): validate here
                    self._finish(it, None)
            if stop:
                return

    def _idle_worker(self) -> ValidatorProcess | None:
        """The live worker with the fewest batches queued, waiting (bounded) while all have two; None when no
        worker is alive."""
        deadline = time.monotonic() + 5.0
        with self._room:
            while True:
                live = [w for w in self._workers if w.alive]
                if not live:
                    return None
                best = min(live, key=lambda w: w.load)
                if best.load < 2 or time.monotonic() > deadline:
                    return best
                self._room.wait(0.05)

    def _validated(self, worker: ValidatorProcess, batch: list[Item], subs: list[Submission] | None,
                   error: str | None) -> None:
        """A batch came back from a validator process (on that worker's reader thread), or the process died
        holding it (``subs`` None): then validate here and replace the process."""
        if subs is None:
            log.error("validator process %d failed (%s); replacing it, validating its %d messages here", worker.pid,
                      error, len(batch))
            self._replace(worker)
            for item in batch:
                self._finish(item, None)
        else:
            for item, sub in zip(batch, subs, strict=True):
                self._finish(item, sub)
        with self._room:
            self._room.notify_all()

    def _replace(self, dead: ValidatorProcess) -> None:
        with self._room:
            if dead not in self._workers or not self._accepting:
                return
            self._workers.remove(dead)
        try:
            fresh = self._spawn(30.0)
        except Exception:
            log.exception("cannot start a new validator process; validating in-process instead")
            return
        with self._room:
            self._workers.append(fresh)
            self._room.notify_all()

    def ingest(self, payload: bytes, *, kind: str = "summary", source: str = "http", topic_device: str | None = None,
               timeout: float = 30.0) -> Outcome:
        """Submit and wait for the commit (blocking helper for tools and tests)."""
        box: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.submit(kind, payload, topic_device=topic_device, source=source, done=box.put)
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            return Outcome(error=f"not committed within {timeout} s")

    def queue_depth(self) -> int:
        with self._lock:
            inbox = self._inbox_depth
        return inbox + self.writer.pending

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until everything submitted so far is committed and its callback ran."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                inbox = self._inbox_depth
            if not inbox and self.writer.flush(0):
                return True
            if inbox:
                time.sleep(0.005)
            else:
                self.writer.flush(max(0.0, deadline - time.monotonic()))
        return self.queue_depth() == 0

    def stop(self, timeout: float = 10.0) -> bool:
        """Pause the sources, commit everything received (acknowledging it), stop the sources, then the
        threads. Bounded by about ``timeout``; returns whether everything stopped cleanly."""
        deadline = time.monotonic() + timeout
        for s in self.sources:
            s.pause()
        flushed = self.flush(max(0.1, timeout * 0.6))
        ok = all([s.stop(max(0.1, deadline - time.monotonic())) for s in self.sources])
        with self._lock:
            self._accepting = False
            threads, self._threads = self._threads, []
        for _ in threads:
            self._inbox.put(None)
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        with self._room:
            workers, self._workers = self._workers, []
        for w in workers:
            ok = w.close(max(0.5, deadline - time.monotonic())) and ok
        ok = self.writer.stop(max(0.1, deadline - time.monotonic())) and ok
        return flushed and ok and not any(t.is_alive() for t in threads)

    def metrics(self) -> str:
        """Prometheus text of the ingest counters (appended to ``ctx.metrics``)."""
        return self.counters.prometheus(self.queue_depth())
