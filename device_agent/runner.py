"""``device-agent run``: the long-running agent — inference over the local HTTP API, windows closing into the
outbox, the MQTT link when a broker is configured, the reported state kept current, and the desired state
(``desired_handler``: accepted or rejected as the link delivers it; a worker thread downloads, installs, watches
the probation and commits or rolls back). A report is queued after every desired-state decision and every
update-state change, and otherwise whenever the reported state differs from the last one queued.

Stops cleanly on SIGTERM/SIGINT: the HTTP server stops taking requests, the current window is closed (held
back if below k), the outbox keeps whatever was not acknowledged, the link stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from edgefleet_contracts.report import Report
from edgefleet_contracts.timeutil import fmt, utcnow

from .agent import Agent
from .config import DeviceDir
from .desired_handler import DesiredHandler, HandlerOptions, read_desired_seq
from .updater import Updater

log = logging.getLogger("edgefleet.agent")
AGENT_VERSION = "0.1.0"


def build_report(device: DeviceDir) -> Report:
    up = Updater(device)
    rec = up.record()
    active, standby = up.slots.active(), up.slots.standby()
    cfg = up.config
    return Report(
        device_id=cfg.device_id, at=fmt(utcnow()),
        active=None if active is None else {"name": active[1].name, "version": active[1].version},
        standby=None if standby is None else {"name": standby[1].name, "version": standby[1].version},
        update_state=str(rec.state), last_result=rec.last_result, agent_version=AGENT_VERSION,
        desired_seq=read_desired_seq(device),
    )


def _server_class() -> Any:
    import contextlib
    from collections.abc import Iterator

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its own shutdown, which would kill the process before the agent
        closes its window and stops its link; here the signal only asks the server to exit."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config: Any) -> Any:  # noqa: N802 - reads like the class it builds
    return _server_class()(config)


class DeviceRunner:
    def __init__(self, device_dir: Path, *, http: bool = True, http_port: int | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 handler_options: HandlerOptions | None = None, report_check_seconds: float = 1.0) -> None:
        self.device = DeviceDir(Path(device_dir))
        self.agent = Agent.open(self.device.path)
        self.cfg = self.agent.cfg
        self.http = http
        self.http_port = http_port if http_port is not None else self.cfg.http_port
        self.link: Any = None
        self._stop = threading.Event()
        self._report_check_seconds = report_check_seconds  # housekeeping: how often the report is rebuilt
        self._last_report: dict[str, Any] | None = None
        self._report_lock = threading.Lock()
        self._server: Any = None
        self.handler = DesiredHandler(self.device, agent=self.agent, on_change=self._update_changed,
                                      options=handler_options)
        if self.cfg.broker:
            from .link import MqttLink

            self.link = MqttLink(self.cfg, self.device, self.agent.sink, self.agent.sign,  # type: ignore[arg-type]
                                 backoff_initial=backoff_initial, backoff_max=backoff_max,
                                 on_desired=self._desired)

    def publish_report_if_changed(self, force: bool = False) -> None:
        """Queue the reported state when it differs from the last one queued (always with ``force``)."""
        with self._report_lock:
            rep = build_report(self.device).to_dict()
            comparable = {k: v for k, v in rep.items() if k != "at"}
            if force or comparable != self._last_report:
                with self.agent.sink.transaction() as tx:
                    tx.put_report(rep)
                self._last_report = comparable

    def _desired(self, payload: bytes) -> None:
        self.handler.receive(payload)  # decided, recorded and reported there; never raises for a bad message

    def _update_changed(self) -> None:
        try:
            self.publish_report_if_changed(force=True)
        except Exception:  # never break a rollout over a report; logged
            log.exception("could not queue the reported state")

    def _housekeeping(self) -> None:
        while not self._stop.wait(self._report_check_seconds):
            try:
                self.publish_report_if_changed()
            except Exception:  # never kill the agent over a report; logged
                log.exception("could not queue the reported state")

    def start(self) -> None:
        """Everything but the HTTP API, in background threads: queue the reported state, resume what the
        accepted desired state still asks for (download, probation), start the link and housekeeping."""
        self.publish_report_if_changed()
        self.handler.start()
        if self.link is not None:
            self.link.start()
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
                self._server = _Server(config)
                self._server.run()  # SIGTERM/SIGINT stop it gracefully; we then clean up below
            else:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: self._stop.set())
                self._stop.wait()
        finally:
            self.stop()
        return 0

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        self.handler.stop()
        self.agent.close()
        if self.link is not None:
            self.link.stop(timeout=5)
