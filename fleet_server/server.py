"""Running the server: store, app, embedded broker (unless external), ingest and drift services, uvicorn."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgefleet_contracts.process import LockHeldError, pid_lock
from edgefleet_contracts.transport import graceful_server

from .app import create_app
from .broker import EmbeddedBroker
from .errors import ConfigError
from .settings import ServerSettings
from .store import Store

log = logging.getLogger("edgefleet.server")

# The embedded broker runs inside this process and holds its queue in memory. It acknowledges a device's
# summary on receipt (the device then deletes it); the server stores it moments later. A SIGTERM drains the
# queue, but a SIGKILL or a crash loses what was queued: with a backlog (devices back from a long outage) that
# was thousands of windows in an audit (2026-11-28). Mosquitto with persistence keeps them.
EMBEDDED_BROKER_WARNING = (
    "embedded MQTT broker: it acknowledges devices' summaries on receipt and queues them in this process's "
    "memory, so a crash or kill -9 of this server loses the summaries still queued (devices have deleted them); "
    "where every summary must survive a crash, run Mosquitto with persistence and serve --broker mqtt://HOST:PORT")


def build(settings: ServerSettings) -> tuple[Any, Any]:
    """The app with ingest, drift, rollouts, the dashboard and housekeeping attached (their start/stop hooks
    registered), and its context."""
    from .dashboard import attach_dashboard
    from .housekeeping import attach_housekeeping
    from .rollouts.routes import attach_rollouts
    from .routes_drift import attach_drift
    from .routes_ingest import attach_ingest

    app = create_app(settings, Store(settings.db_path))
    ctx = app.state.ctx
    attach_ingest(app, ctx)
    attach_drift(app, ctx)
    attach_rollouts(app, ctx, tick_seconds=settings.rollout_tick_seconds)
    attach_dashboard(app, ctx)
    attach_housekeeping(app, ctx)
    return app, ctx


def serve(settings: ServerSettings) -> int:
    """Run the server until SIGTERM/SIGINT. Raises ConfigError (before anything starts) when another ``serve``
    holds this data folder or the HTTP address cannot be listened on."""
    import uvicorn

    with _one_server(settings.data_dir):
        _check_listen(settings.http_host, settings.http_port)
        return _serve(settings, uvicorn)


@contextlib.contextmanager
def _one_server(data_dir: Path) -> Iterator[None]:
    """Hold ``<data>/serve.lock`` (flock) while serving: two servers on one data folder would ingest, page
    on-call and drive rollouts twice, and take the broker session from each other (an audit saw 47 reconnects in
    15 s and duplicate pages). The lock dies with the process, so a crash never leaves the folder locked."""
    path = data_dir / "serve.lock"
    held = contextlib.ExitStack()
    try:
        held.enter_context(pid_lock(path))  # only taking the lock is translated: not what the server raises later
    except LockHeldError as exc:
        raise ConfigError(f"another fleet-server serve (pid {exc.holder}) is running on {data_dir}; stop it first "
                          "(one server per data folder)") from None
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror or exc} (serve needs a writable data folder)") from None
    with held:
        yield


def _check_listen(host: str, port: int) -> None:
    """Bind the HTTP address once before anything starts (uvicorn binds after the app's startup, which starts
    ingest, alert delivery and rollouts): a taken port stops ``serve`` before it pages anyone."""
    if not port:
        return
    try:  # every address the host name has, as uvicorn would bind it (a name may resolve to IPv6 only)
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc} (the http setting "
                          "in server.toml, or --http)") from None
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
                return
            except OSError as exc:
                error = exc
    raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {error.strerror if error else 'no address'} "
                      "(the http setting in server.toml, or --http)")


def _serve(settings: ServerSettings, uvicorn: Any) -> int:
    broker = None
    if settings.broker == "embedded":
        broker = EmbeddedBroker(settings.embedded_mqtt_host, settings.embedded_mqtt_port).start()
        settings = replace(settings, embedded_mqtt_port=broker.port)
        log.warning(EMBEDDED_BROKER_WARNING)
    app, ctx = build(settings)
    print(f"fleet-server: HTTP on http://{settings.http_host}:{settings.http_port}  MQTT {settings.broker_url()}"
          f"  data {settings.data_dir}  dashboard http://{settings.http_host}:{settings.http_port}/ui/",
          flush=True)
    # SIGTERM: a graceful exit whose lifespan shutdown flushes ingest
    server = graceful_server(uvicorn.Config(app, host=settings.http_host, port=settings.http_port,
                                            log_level="warning", access_log=False))
    try:
        server.run()
    finally:
        # The lifespan shutdown has stopped ingest, drift, rollouts and housekeeping; closing every thread's
        # connection checkpoints the WAL, so a cleanly stopped server leaves one self-contained database file to
        # back up.
        ctx.store.close(checkpoint=True)
        if broker is not None:
            broker.stop()
    return 0
