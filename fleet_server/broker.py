"""The embedded MQTT broker (amqtt) for zero-setup serving, on loopback by default.

Fine as the default and for small fleets; FIELD-NOTES measured it ~4x slower than Mosquitto with memory growth
over long runs, so production fleets point ``--broker mqtt://…`` at Mosquitto or EMQX (configure Mosquitto with
a large ``max_queued_messages`` and ``max_queued_bytes 0`` so a slow subscriber never loses QoS 1 messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import Any

from .errors import ConfigError


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1884) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start in a background thread; raises ConfigError when the port cannot be bound."""
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = int(s.getsockname()[1])
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise ConfigError(f"embedded MQTT broker could not listen on {self.host}:{self.port}: {self._error}")
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        cfg = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 10000}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        try:
            self._broker = Broker(cfg, loop=loop)
            loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to start() with the reason
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        with contextlib.suppress(Exception):  # shutting down anyway
            loop.run_until_complete(self._broker.shutdown())
        loop.close()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
