"""Summary, report and heartbeat ingest: one validation path for MQTT and HTTP, one batched durable writer.

Modules: ``results`` (what the stages hand over, limits, reasons), ``parsing`` (untrusted bytes to JSON),
``fastpath`` (the common well-formed summary message decided in one msgspec pass, its signed bytes verified as
received; anything else goes to the full path, which names the problem),
``signatures`` (device keys, Ed25519 verification), ``validation`` (``Validator``), ``ratelimit``
(``RateLimiter``), ``workers`` (validator processes), ``writer`` (``IngestWriter``: the durable store and the
quarantine rows), ``counters`` (``IngestCounters``, Prometheus text), ``service`` (``IngestService``: the
pipeline, everything started and stopped together). Throughput: ``bench/ingest.py`` and the README.

Validation (``Validator``) is pure apart from store look-ups (one query per batch of messages for the device
keys of their MQTT topics and one for which summaries are already stored; parsed keys and published versions
cached). A message is checked in this order, cheapest first, each
failure with its own reason token (the quarantine ``reason`` and the ``rejected_total{reason}`` label):

==========================  ===========================================================================
``too_large``               the message is over ``MAX_MESSAGE_BYTES``, or one envelope's signed summary is
                            over ``settings.max_summary_bytes``
``malformed_json``          not UTF-8 JSON, nested deeper than 32 levels, or NaN / Infinity
``shape``                   not one envelope ``{"signed", "signatures"}`` or a list of 1..500 of them
``schema``                  ``Summary.from_dict`` refuses the signed part (type, spec, fields, types)
``unknown_device``          the summary's device is not enrolled
``device_revoked``          the summary's device was revoked by an operator (lost, stolen, retired)
``topic_mismatch``          MQTT only: the topic's device is not the summary's device
``bad_signature``           no valid signature by the device's enrolled key
``unknown_model_version``   the model version is not published
``future_timestamp``        the window starts or ends more than 5 minutes in the future
``rate_limited``            the device is over ``settings.device_rate_per_minute`` (token bucket)
==========================  ===========================================================================

The first three reject the whole message; the others reject one envelope, and the message's good envelopes
are still stored. A summary whose ``(device_id, seq)`` is already stored is a ``duplicate``: acknowledged and
ignored, never quarantined, and it takes no token. Only summaries that pass every check take a token, so
forged summaries cannot drain a device's bucket; a device whose bucket is already empty is refused before the
costly signature check, so a flooding device costs little and other devices are not slowed.

Rate limiting, decided: a summary over its device's rate is acknowledged (MQTT; not acknowledging would stall
the server's shared in-flight window for every device) and **quarantined whole** with reason
``rate_limited``, so nothing a device sent is silently lost while the flood is modest (an operator can list
and replay it; HTTP clients get it back as ``rate_limited`` / 429 and may resend). So that a flood cannot
fill the disk, each device also has a quarantine allowance (``settings.rate_limited_quarantine_per_minute``,
a second token bucket): past it, rate-limited summaries are acknowledged and dropped, counted in
``edgefleet_ingest_dropped_total{reason="rate_limited"}``; ``edgefleet_ingest_rejected_total{reason}`` counts
every refusal. The default rate (600 a minute per device, bursts of 600) is far above a device's normal rate
(one window a minute); a device catching up after days offline sends its backlog in batches and may be paced.

Reports (signed, retained) go through size, JSON, shape, schema, device, topic, signature and future checks;
the newest per device (by ``at``) is kept in ``devices.reported``. Heartbeats are unsigned: they only move
``devices.last_seen`` of an enrolled device whose id matches the topic.

``IngestWriter`` commits in one thread: each transaction holds up to ``settings.ingest_batch`` rows (a single
larger message stays one transaction), ``INSERT OR IGNORE`` keeps ``(device_id, seq)`` unique, rejections
go to ``quarantine`` and ``devices.last_seen`` moves in the same transaction. A submission's ``done``
callback fires only after its transaction committed: the MQTT acknowledgement and the HTTP answer come after
durability. Commits are group commits: the writer takes whatever arrived while the previous transaction
committed, so nothing waits for a timer and no row waits longer than ``settings.ingest_flush_seconds``.

Stored ``summaries.body`` is the JSON of the summary document exactly as the device signed it: the canonical
form (sorted keys, no spaces) for every agent (``Summary.from_dict(json.loads(body))`` reads it back); window
times in the row's columns are normalised to ``…Z``.
"""

from .counters import IngestCounters
from .ratelimit import RateLimiter
from .results import (
                      KINDS,
                      MAX_ENVELOPES,
                      MAX_MESSAGE_BYTES,
                      QUARANTINE_PAYLOAD_BYTES,
                      REASONS,
                      Accepted,
                      Checked,
                      Outcome,
                      Rejection,
                      ReportUpdate,
                      Submission,
)
from .service import IngestService, IngestSource
from .validation import Validator
from .writer import IngestWriter

__all__ = [
    "Accepted",
    "Checked",
    "IngestCounters",
    "IngestService",
    "IngestSource",
    "IngestWriter",
    "KINDS",
    "MAX_ENVELOPES",
    "MAX_MESSAGE_BYTES",
    "Outcome",
    "QUARANTINE_PAYLOAD_BYTES",
    "RateLimiter",
    "REASONS",
    "Rejection",
    "ReportUpdate",
    "Submission",
    "Validator",
]
