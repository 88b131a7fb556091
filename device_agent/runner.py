"""``device-agent run``: the long-running agent — inference over the local HTTP API, windows closing into the
outbox, the MQTT link when a broker is configured, the reported state kept current, and the desired state
(``desired_handler``: accepted or rejected as the link delivers it; a worker thread downloads, installs, watches
the probation and commits or rolls back). A report is queued after every desired-state decision and every
update-state change, and otherwise whenever the reported state differs from the last one queued. The periodic
check (every second) first compares a fingerprint of the files the report is built from (``ReportInputs``: a
few ``os.stat`` calls); the report is rebuilt only when that changed (``DeviceRunner.report_rebuilds`` counts
rebuilds), since rebuilding reads the config, the update record, the pointer and every slot's manifest (~2 ms
on an idle x86 core, several times that on a busy one).

Stops cleanly on SIGTERM/SIGINT: the HTTP server stops taking requests, the current window is closed (held
back if below k), the outbox keeps whatever was not acknowledged, the link stops.

``device-agent serve`` (several uvicorn worker processes, one device) reports like any device through
``ServeLink``: every worker makes one, and the worker holding an exclusive ``flock`` on ``<dir>/serve.lock`` runs
a ``DeviceRunner`` without HTTP on its own agent — one MQTT link, one outbox reader, one device identity, one
``agent.json`` for the whole service — while every worker's windows close into the shared outbox (one SQLite file;
sequence numbers are taken inside its transactions). The other workers retry the lock every second, so when the
holder dies (the kernel drops its lock) another worker takes the link over. Desired states are handled as in
``run``: the holder downloads, installs and activates; every worker picks the new active slot up on its next
one-second tick (``Agent.reload``); probation judges the holder's share of the traffic (about 1/workers of it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.manifest import MANIFEST_NAME
from edgefleet_contracts.report import Report
from edgefleet_contracts.timeutil import fmt, utcnow
from edgefleet_contracts.transport import graceful_server

from .agent import Agent
from .config import DeviceDir
from .desired_handler import DESIRED_FILE, DesiredHandler, HandlerOptions, read_desired_state
from .outbox import OutboxFullError
from .slots import COMPLETE_MARKER, SLOT_NAMES, SMOKE_FILE, read_manifest
from .trust_store import TrustStore, TrustStoreError
from .updater import Updater

log = logging.getLogger("edgefleet.agent")
AGENT_VERSION = "0.1.0"


def local_url(host: str, port: int) -> str | None:
    """The address a process on the device reaches an API bound to ``host``:``port`` at (None for port 0: chosen
    by the kernel at start, not known here). A wildcard host is reached over loopback."""
    if not port:
        return None
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def build_report(device: DeviceDir) -> Report:
    up = Updater(device)
    rec = up.record()
    active, standby = up.slots.active(), up.slots.standby()
    cfg = up.config
    desired_seq, desired_outcome = read_desired_state(device)
    return Report(
        device_id=cfg.device_id, at=fmt(utcnow()),
        active=None if active is None else {"name": active[1].name, "version": active[1].version},
        standby=None if standby is None else {"name": standby[1].name, "version": standby[1].version},
        update_state=str(rec.state), last_result=_shared_result(rec.last_result), agent_version=AGENT_VERSION,
        desired_seq=desired_seq, desired_outcome=desired_outcome, target=cfg.target,
    )


def _shared_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The install result as the report shares it: the package by its file name, not the path it had on the
    device (a folder name can say more about the device's user than the fleet needs)."""
    if not result or not result.get("package"):
        return result
    return {**result, "package": Path(str(result["package"])).name}


Stat = tuple[int, int, int, int] | None  # (inode, size, mtime_ns, ctime_ns); None: absent


def _stat(path: str) -> Stat:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ReportInputs:
    """A cheap fingerprint of everything ``build_report`` reads, or whose presence it checks: the files
    ``Updater()`` opens (config, target, pinned keys, trust.json), ``update.json``, ``active.json``,
    ``desired.json``, and per slot its folder, ``.complete``, ``.smoke.json``, ``manifest.json`` and the model
    file the manifest names (looked up again only when the manifest changed). About 20 ``os.stat`` calls.

    Every write the agent makes is an atomic replace (new inode), and a folder's mtime changes whenever an entry
    is added, removed or renamed, so an unchanged fingerprint means an unchanged report. A fingerprint holding a
    timestamp within ``settle_seconds`` of the moment it was taken is *unsettled* (``take`` returns None): a
    second change within the file system's timestamp granularity could leave it equal, so the caller rebuilds
    (the "racy" rule of git's index).
    """

    def __init__(self, device: DeviceDir, *, settle_seconds: float = 2.0) -> None:
        self.settle_ns = int(settle_seconds * 1e9)
        d = device
        self._files = [str(p) for p in (d.config_file, d.target_file, d.root_pub, d.fleet_pub, d.trust_file,
                                        d.update_file, d.active_file, d.path / DESIRED_FILE)]
        self._slots = [(d.slot(name), [str(d.slot(name) / f) for f in ("", COMPLETE_MARKER, SMOKE_FILE)],
                        str(d.slot(name) / MANIFEST_NAME)) for name in SLOT_NAMES]
        self._model_file: dict[Path, tuple[Stat, str | None]] = {}  # slot -> (manifest stat, model file path)

    def _model_stat(self, folder: Path, manifest: Stat) -> Stat:
        cached = self._model_file.get(folder)
        if cached is None or cached[0] != manifest:
            m = None if manifest is None else read_manifest(folder)
            cached = self._model_file[folder] = (manifest, None if m is None else str(folder / m.model_file))
        return None if cached[1] is None else _stat(cached[1])

    def take(self) -> tuple[Stat, ...] | None:
        """The fingerprint now, or None when it is unsettled or a file could not be looked at."""
        now_ns = time.time_ns()
        try:
            stats = [_stat(p) for p in self._files]
            for folder, paths, manifest_path in self._slots:
                manifest = _stat(manifest_path)
                stats += [_stat(p) for p in paths]
                stats += [manifest, self._model_stat(folder, manifest)]
        except OSError:  # e.g. permission denied: let the rebuild report (or raise) as before
            return None
        recent = now_ns - self.settle_ns
        if any(st is not None and (st[2] >= recent or st[3] >= recent) for st in stats):
            return None
        return tuple(stats)


class DeviceRunner:
    def __init__(self, device_dir: Path, *, agent: Agent | None = None, http: bool = True,
                 http_port: int | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 handler_options: HandlerOptions | None = None, report_check_seconds: float = 1.0,
                 housekeeping: bool = True, report_settle_seconds: float = 2.0) -> None:
        """``housekeeping=False``: no thread of its own checks the report every ``report_check_seconds``; the
        caller calls ``check_report()`` instead (the fleet simulator does it for all its devices from one
        thread). ``report_settle_seconds``: see ``ReportInputs`` (more than the file system's timestamp
        granularity; tests shorten it). ``agent``: run on this agent (opened on ``device_dir``) instead of opening
        one; ``stop`` closes it either way."""
        self.device = DeviceDir(Path(device_dir))
        self.agent = agent if agent is not None else Agent.open(self.device.path)
        self.cfg = self.agent.cfg
        self.http = http
        self.http_port = http_port if http_port is not None else self.cfg.http_port
        self.link: Any = None
        self._stop = threading.Event()
        self._report_check_seconds = report_check_seconds  # housekeeping: how often the report is checked
        self._housekeeping_thread = housekeeping
        self._last_report: dict[str, Any] | None = None
        self._report_inputs = ReportInputs(self.device, settle_seconds=report_settle_seconds)
        self._report_fingerprint: tuple[Stat, ...] | None = None  # of what the last queued report was built from
        self.report_rebuilds = 0  # how often the report was built from the folder
        self._report_waits_for_space = False  # the last report could not be queued: the disk is full
        self._report_lock = threading.Lock()
        self._trust: TrustStore | None = None  # housekeeping keeps its clock mark near the present
        try:
            self._trust = TrustStore(self.device)
        except TrustStoreError as exc:
            log.warning("the trust store's clock mark will only move with decisions: %s", exc)
        self._server: Any = None
        self._announced = False  # agent.json written by this runner (``_announce``)
        self.handler = DesiredHandler(self.device, agent=self.agent, on_change=self._update_changed,
                                      options=handler_options)
        if self.cfg.broker:
            from .link import MqttLink

            self.link = MqttLink(self.cfg, self.device, self.agent.sink, self.agent.sign,  # type: ignore[arg-type]
                                 backoff_initial=backoff_initial, backoff_max=backoff_max,
                                 on_desired=self._desired)

    def publish_report_if_changed(self, force: bool = False) -> None:
        """Queue the reported state when it differs from the last one queued (always with ``force``).

        Without ``force`` nothing is read when the files the report is built from are unchanged since the last
        report was built (``ReportInputs``). Raises what ``build_report`` and the outbox raise."""
        with self._report_lock:
            fingerprint = self._report_inputs.take()  # before reading: a change while building is seen next time
            if not force and fingerprint is not None and fingerprint == self._report_fingerprint:
                return
            self.report_rebuilds += 1
            rep = build_report(self.device).to_dict()
            comparable = {k: v for k, v in rep.items() if k != "at"}
            if force or comparable != self._last_report:
                with self.agent.sink.transaction() as tx:
                    tx.put_report(rep)
                self._last_report = comparable
            self._report_fingerprint = fingerprint

    def _publish_report_unless_full(self) -> None:
        """``publish_report_if_changed``; a full disk is logged once per episode (not every second, without a
        trace), and the report is queued by a later check once space frees."""
        try:
            self.publish_report_if_changed()
        except OutboxFullError as exc:
            if not self._report_waits_for_space:
                log.warning("the reported state is queued when disk space frees: %s", exc)
            self._report_waits_for_space = True
        else:
            self._report_waits_for_space = False

    def _desired(self, payload: bytes) -> None:
        self.handler.receive(payload)  # decided, recorded and reported there; never raises for a bad message

    def _update_changed(self) -> None:
        try:
            self.publish_report_if_changed(force=True)
        except Exception:  # never break a rollout over a report; logged
            log.exception("could not queue the reported state")

    def check_report(self) -> None:
        """The periodic check: queue the reported state if it changed, and move the trust store's clock mark
        forward (``TrustStore.advance``: a write every 10 minutes at most, so a clock set back on an idle
        device is caught against a recent time); never raises (failures are logged). Does nothing once the
        runner is stopped."""
        if self._stop.is_set():
            return
        try:
            self._publish_report_unless_full()
        except Exception:  # never kill the agent over a report; logged
            log.exception("could not queue the reported state")
        if self._trust is not None:
            try:
                self._trust.advance()
            except TrustStoreError as exc:
                log.warning("could not move the trust store's clock mark: %s", exc)

    def _housekeeping(self) -> None:
        while not self._stop.wait(self._report_check_seconds):
            self.check_report()

    def start(self) -> None:
        """Everything but the HTTP API, in background threads: queue the reported state, resume what the
        accepted desired state still asks for (download, probation), start the link and housekeeping (unless
        the caller does it: ``housekeeping=False``). A full disk does not stop it: the report is queued by the
        periodic check once space frees."""
        self._publish_report_unless_full()
        self.handler.start()
        if self.link is not None:
            self.link.start()
        if self._housekeeping_thread:
            threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()

    def run(self) -> int:
        self.start()
        try:
            if self.http:
                import uvicorn

                from .http_api import create_app

                app = create_app(self.agent)
                config = uvicorn.Config(app, host=self.cfg.http_host, port=self.http_port, log_level="warning",
                                        access_log=False, lifespan="off")
                self._server = graceful_server(config)  # the agent closes its window, stops its link
                self._announce(local_url(self.cfg.http_host, self.http_port))
                self._server.run()  # SIGTERM/SIGINT stop it gracefully; we then clean up below
            else:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: self._stop.set())
                self._stop.wait()
        finally:
            self.stop()
        return 0

    def _announce(self, url: str | None) -> None:
        """Write ``agent.json`` (pid, local API address), so ``device-agent status`` can ask this agent for its
        counters; removed again by ``stop``. Best effort: a folder it cannot be written to only costs that."""
        doc = {"pid": os.getpid(), "http": url, "started": fmt(utcnow())}
        try:
            atomic_write_text(self.device.agent_file, json.dumps(doc, sort_keys=True) + "\n")
            self._announced = True
        except OSError as exc:
            log.warning("cannot write %s (device-agent status will not show this agent's counters): %s",
                        self.device.agent_file, exc)

    def _withdraw(self) -> None:
        if not self._announced:
            return
        self._announced = False
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.device.agent_file.read_text()).get("pid") == os.getpid():
                self.device.agent_file.unlink()

    def stop(self, *, close_agent: bool = True) -> None:
        """Stop the link, the handler and the local API; ``close_agent`` False leaves the agent open (a serve
        worker whose link failed to start keeps serving with it)."""
        self._withdraw()
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        self.handler.stop()
        if close_agent:
            self.agent.close()
        if self.link is not None:
            self.link.stop(timeout=5)


SERVE_LOCK = "serve.lock"


class ServeLink:
    """The one link of ``device-agent serve`` (module docstring): made by every worker on its agent; the worker
    that holds ``<dir>/serve.lock`` runs a ``DeviceRunner(http=False)`` on it and announces ``url`` in
    ``agent.json``. ``close`` (the worker's shutdown) stops that runner, which closes the agent, or closes the
    agent itself when this worker never held the link."""

    def __init__(self, device_dir: Path, agent: Agent, url: str | None, *, retry_seconds: float = 1.0,
                 **runner_options: Any) -> None:
        self.device = DeviceDir(Path(device_dir))
        self.agent = agent
        self.url = url
        self.retry_seconds = retry_seconds
        self.runner_options = runner_options
        self.runner: DeviceRunner | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._elect, name="serve-link", daemon=True)

    @property
    def holding(self) -> bool:
        """This worker runs the service's link."""
        return self.runner is not None

    def start(self) -> None:
        self._thread.start()

    def _try_lock(self) -> bool:
        try:
            if self._fd is None:
                self._fd = os.open(self.device.path / SERVE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another worker holds the link
        except OSError as exc:
            log.warning("cannot take %s (retrying): %s", self.device.path / SERVE_LOCK, exc)
            return False
        return True

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # drops the flock
            self._fd = None

    def _elect(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.retry_seconds
            if not self._try_lock():
                continue
            with self._lock:
                if self._stop.is_set():
                    break
                runner: DeviceRunner | None = None
                try:
                    runner = DeviceRunner(self.device.path, agent=self.agent, http=False, **self.runner_options)
                    runner.start()
                    runner._announce(self.url)
                except Exception:  # a broken config or trust store, agent.json not writable: logged; the runner
                    # (if half started) stops, the lock goes, and the next try is later
                    log.exception("this serve worker cannot run the device's link; retrying")
                    if runner is not None:
                        with contextlib.suppress(Exception):
                            runner.stop(close_agent=False)
                    self._release()
                    continue
                self.runner = runner
                log.info("serve worker %d runs the device's link", os.getpid())
            return

    def close(self) -> None:
        """Stop the link (when held) and close the agent; idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._lock:
            runner, self.runner = self.runner, None
            agent, self.agent = self.agent, None  # type: ignore[assignment]
        if runner is not None:
            runner.stop()
        elif agent is not None:
            agent.close()
        self._release()
