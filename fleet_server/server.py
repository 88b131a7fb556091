"""Running the server: store, app, embedded broker (unless external), ingest and drift services, uvicorn."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from edgefleet_contracts.transport import graceful_server

from .app import create_app
from .broker import EmbeddedBroker
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
    import uvicorn

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
