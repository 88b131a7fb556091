"""What the agent and the server both do at their network edges, written once: credentials and TLS on a paho
MQTT client, and a uvicorn server that exits gracefully on SIGTERM.

paho and uvicorn are imported by the callers (this module stays free of heavy imports, like the rest of the
package).
"""

from __future__ import annotations

import contextlib
import signal
import ssl
from collections.abc import Iterator
from typing import Any

__all__ = ["graceful_server", "secure_client"]


def secure_client(client: Any, *, username: str | None, password: str | None, tls: bool,
                  ca_certs: str | None) -> None:
    """Set the username/password (when a username is given) and TLS (when ``tls``; ``ca_certs`` None: the
    system's CAs) on a paho client. Raises ValueError naming what failed (an unreadable CA file, a bad
    certificate): the caller wraps it in its own configuration error."""
    if username:
        client.username_pw_set(username, password)
    if tls:
        try:
            client.tls_set(ca_certs=ca_certs)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ValueError(f"TLS setup failed (CA file {ca_certs!r}): {exc}") from exc


def graceful_server(config: Any) -> Any:
    """A ``uvicorn.Server`` for ``config`` on which SIGTERM and SIGINT only ask the server to exit.

    uvicorn re-raises the signal after its own shutdown, which would end the process before the caller's
    clean-up (the server's ingest flush, the agent closing its window and stopping its link) runs."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
