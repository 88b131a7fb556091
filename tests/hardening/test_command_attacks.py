"""Desired-state (command) attacks through the real device handler (``DesiredHandler.receive`` then
``converge``), a real agent serving, real signed packages on a real HTTP server.

Each attack must be refused with its reason (``last_rejection`` or the outcome of the accepted seq) while the
active model, the slots, the trust store files (byte for byte) and the agent's counters stay as they were and
``Agent.predict`` keeps answering with 1.0.0. Issue 8's list: forged; replayed; expired; for another device;
pointing at a package that no trusted manifest lists (the command is fleet-signed, but the package it names is
not signed by a trusted key, or is not the bytes it names at all). Also a server that streams endless bytes
past the declared length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from device_agent.agent import Agent
from device_agent.desired_handler import DesiredHandler
from edgefleet_contracts.signing import generate_key
from tests.device_agent import packages, with_version
from tests.device_agent.test_desired import desired, options, provisioned, settle
from tests.device_agent.test_download import PackageServer

from .device_state import Snapshot, rows, unchanged_after


@pytest.fixture
def server() -> Iterator[PackageServer]:
    with PackageServer() as srv:
        yield srv


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    opened: list[Agent] = []
    yield opened
    for a in opened:
        a.close()


def _replayed(ctx: dict[str, Any]) -> bytes:
    return ctx["seq4"]  # the genuine, fleet-signed seq 4, sent again after seq 5 was accepted


def _tampered(ctx: dict[str, Any]) -> bytes:
    env = json.loads(desired(6, "1.1.0", ctx["url"], ctx["data"]))
    env["signed"]["model"]["version"] = "9.0.0"
    return json.dumps(env).encode()


# Refused on receipt: name -> (message builder, reason, message fragment)
ON_RECEIPT: dict[str, tuple[Callable[[dict[str, Any]], bytes], str, str]] = {
    "forged (signed by another key)": (lambda c: desired(6, "1.1.0", c["url"], c["data"], key=generate_key()),
                                       "untrusted_key", "not trusted"),
    "altered after signing": (_tampered, "bad_signature", "does not verify"),
    "replayed": (_replayed, "rollback", "seq 4 is not newer than 5 already accepted (replay)"),
    "expired": (lambda c: desired(6, "1.1.0", c["url"], c["data"], issued_ago=timedelta(hours=2)),
                "expired", "desired state seq 6 expired at"),
    "for another device": (lambda c: desired(6, "1.1.0", c["url"], c["data"], device_id="dev-2"),
                           "wrong_device", "addressed to 'dev-2', not this device ('dev-1')"),
}


def _device(built: Any, tmp_path: Any, server: PackageServer, agents: list[Agent]) -> tuple[Any, Any, Any, dict]:
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    agent = Agent.open(dev.path, background=False)
    agents.append(agent)
    h = DesiredHandler(dev, agent=agent, options=options())
    v100 = pk.v100.read_bytes()
    u100 = server.add("clinical-1.0.0", v100)
    seq4 = desired(4, "1.0.0", u100, v100)
    for msg in (seq4, desired(5, "1.0.0", u100, v100)):  # what it already runs: nothing to download
        assert h.receive(msg).kind == "accepted"
        assert settle(h).what == "current"
    data = pk.v110.read_bytes()
    ctx = {"url": server.add("clinical-1.1.0", data), "data": data, "seq4": seq4}
    return dev, agent, h, ctx


@pytest.mark.parametrize("case", list(ON_RECEIPT))
def test_a_command_attack_is_refused_on_receipt_and_changes_nothing(built, tmp_path, server, agents, case):
    dev, agent, h, ctx = _device(built, tmp_path, server, agents)
    x = rows(built)
    assert agent.predict(x[0]).version == "1.0.0"
    before = Snapshot.take(dev, agent)
    make, reason, message = ON_RECEIPT[case]

    d = h.receive(make(ctx))

    assert (d.kind, d.reason) == ("rejected", reason), d.message
    assert message in d.message, d.message
    rej = h.record().last_rejection
    assert rej is not None and (rej["reason"], rej["message"]) == (reason, d.message)
    assert settle(h).what == "seq 5 done (current)"  # nothing new to work on
    assert server.requests == []  # nothing downloaded
    unchanged_after(dev, agent, before, x[1], "1.0.0")


def _untrusted_package(built: Any, tmp_path: Any) -> bytes:
    return with_version(built, packages(built).v110, tmp_path / "rogue.efpkg", "1.1.0",
                        signer=generate_key()).read_bytes()


# Accepted (fleet-signed, for this device, fresh), then refused at the package: name -> (setup, reason, message)
AT_PACKAGE: dict[str, tuple[Callable[[Any, Any, PackageServer, dict[str, Any]], bytes], str, str]] = {
    "names a package no trusted key signed": (
        lambda b, t, s, c: desired(6, "1.1.0", s.add("rogue", p := _untrusted_package(b, t)), p),
        "untrusted_key", "not trusted; trusted keys"),
    "names bytes the server does not have": (
        lambda b, t, s, c: desired(6, "1.1.0", c["url"], c["data"], sha256=hashlib.sha256(b"elsewhere").hexdigest()),
        "hash_mismatch", "sha256"),
    "server streams endless bytes past the declared length": (
        lambda b, t, s, c: (setattr(s, "extra", b"\0" * (8 << 20)), desired(6, "1.1.0", c["url"], c["data"]))[1],
        "length_exceeded", ""),
}


@pytest.mark.parametrize("case", list(AT_PACKAGE))
def test_a_command_naming_an_untrusted_package_installs_nothing(built, tmp_path, server, agents, case):
    dev, agent, h, ctx = _device(built, tmp_path, server, agents)
    x = rows(built)
    assert agent.predict(x[0]).version == "1.0.0"
    before = Snapshot.take(dev, agent)
    setup, reason, message = AT_PACKAGE[case]

    assert h.receive(setup(built, tmp_path, server, ctx)).kind == "accepted"
    settle(h)

    out = h.record().outcome
    assert out is not None and out["seq"] == 6 and out["reason"] == reason and out["final"] is True, out
    assert out["status"] in ("rejected", "failed") and message in out["message"], out
    assert len(server.requests) == 1  # final: not retried
    assert list((dev.path / "downloads").iterdir()) == []  # the refused file is gone
    unchanged_after(dev, agent, before, x[1], "1.0.0", allow=("desired_seq",))  # seq 6 was accepted, only that
