"""The MQTT topic layout, defined once.

    edgefleet/<fleet>/<device>/summary    device -> server, QoS 1: signed window summaries (a JSON list of them)
    edgefleet/<fleet>/<device>/report     device -> server, QoS 1, retained: reported state (what it runs)
    edgefleet/<fleet>/<device>/heartbeat  device -> server, QoS 0: liveness
    edgefleet/<fleet>/<device>/desired    server -> device, QoS 1, retained: signed desired state

Fleet and device ids are restricted to ``[A-Za-z0-9_.-]`` so they can never inject MQTT wildcards or levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SchemaError

PREFIX = "edgefleet"
KINDS = ("summary", "report", "heartbeat", "desired")
_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


def check_id(value: str, what: str) -> str:
    """Raises SchemaError when ``value`` is not a safe fleet or device id."""
    if not isinstance(value, str) or not _ID.match(value) or value in (".", ".."):
        raise SchemaError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return value


def topic(fleet: str, device: str, kind: str) -> str:
    if kind not in KINDS:
        raise SchemaError(f"unknown topic kind {kind!r}; known: {', '.join(KINDS)}")
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/{check_id(device, 'device id')}/{kind}"


def subscription(fleet: str, kind: str) -> str:
    """Wildcard subscription for one kind across a fleet's devices."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/+/{kind}"


@dataclass(frozen=True)
class Topic:
    fleet: str
    device: str
    kind: str


def parse_topic(text: str) -> Topic:
    """Raises SchemaError for any topic outside the layout."""
    parts = text.split("/")
    if len(parts) != 4 or parts[0] != PREFIX or parts[3] not in KINDS:
        raise SchemaError(f"topic {text!r} is not edgefleet/<fleet>/<device>/<{'|'.join(KINDS)}>")
    return Topic(check_id(parts[1], "fleet id"), check_id(parts[2], "device id"), parts[3])
