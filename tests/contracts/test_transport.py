"""The network-edge helpers the agent and the server share: paho credentials and TLS, graceful uvicorn."""

from __future__ import annotations

import signal
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet_contracts.transport import graceful_server, secure_client


def _client() -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311)


def test_an_unreadable_ca_file_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ValueError, match="no-such-ca.pem"):
        secure_client(_client(), username=None, password=None, tls=True, ca_certs=str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="TLS setup failed"):
        secure_client(_client(), username=None, password=None, tls=True, ca_certs=str(garbage))


def test_credentials_and_tls_are_set_only_when_asked() -> None:
    plain = _client()
    secure_client(plain, username=None, password="ignored", tls=False, ca_certs=None)
    assert plain._username is None and plain._ssl_context is None
    secured = _client()
    secure_client(secured, username="dev-1", password="s3cret", tls=True, ca_certs=None)  # the system's CAs
    assert secured._username == b"dev-1" and secured._password == b"s3cret"
    assert secured._ssl_context is not None


def test_the_graceful_server_takes_sigterm_as_a_request_to_exit_and_does_not_raise_it_again() -> None:
    """uvicorn's own server raises the signal again after its shutdown (which would end the process before the
    caller's clean-up); this one only records it as a request to exit."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: seen.append(sig))
    try:
        server = graceful_server(uvicorn.Config(app=lambda *a: None, host="127.0.0.1", port=0))
        with server.capture_signals():
            signal.raise_signal(signal.SIGTERM)
            assert server.should_exit
        assert seen == []  # the stock uvicorn.Server hands it to this handler here
        signal.raise_signal(signal.SIGTERM)  # the caller's handler is back
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
