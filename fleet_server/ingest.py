"""Summary, report and heartbeat ingest: one validation path for MQTT and HTTP, one batched durable writer.

Validation (``Validator``) is pure apart from cached store look-ups. A message is checked in this order, each
failure with its own reason token (the quarantine ``reason`` and the ``rejected_total{reason}`` label):

==========================  ===========================================================================
``too_large``               the message is over ``MAX_MESSAGE_BYTES``, or one envelope's signed summary is
                            over ``settings.max_summary_bytes``
``malformed_json``          not UTF-8 JSON, nested deeper than 32 levels, or NaN / Infinity
``shape``                   not one envelope ``{"signed", "signatures"}`` or a list of 1..500 of them
``schema``                  ``Summary.from_dict`` refuses the signed part (type, spec, fields, types)
``unknown_device``          the summary's device is not enrolled
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

Reports (signed, retained) go through size, JSON, shape, schema, device, topic, signature and future checks;
the newest per device (by ``at``) is kept in ``devices.reported``. Heartbeats are unsigned: they only move
``devices.last_seen`` of an enrolled device whose id matches the topic.

``IngestWriter`` commits in one thread: each transaction holds up to ``settings.ingest_batch`` rows (a single
larger message stays one transaction), ``INSERT OR IGNORE`` keeps ``(device_id, seq)`` unique, rejections
go to ``quarantine`` and ``devices.last_seen`` moves in the same transaction. A submission's ``done``
callback fires only after its transaction committed: the MQTT acknowledgement and the HTTP answer come after
durability. Commits are group commits: the writer takes whatever arrived while the previous transaction
committed, so nothing waits for a timer and no row waits longer than ``settings.ingest_flush_seconds``.

Stored ``summaries.body`` is the canonical JSON (sorted keys, as signed by the device) of the summary document
(``Summary.from_dict(json.loads(body))`` reads it back); window times are normalised to ``…Z``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from edgefleet_contracts.canonical import MAX_DEPTH, canonical_bytes
from edgefleet_contracts.errors import ContractError, SchemaError
from edgefleet_contracts.report import Report
from edgefleet_contracts.signing import Ed25519PublicKey, envelope_signatures, key_id, public_from_b64, short
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.timeutil import fmt, parse
from edgefleet_contracts.topics import check_id

from .errors import RejectedError
from .settings import ServerSettings
from .store import Store

_orjson: Any
try:  # optional speed-up (not a declared dependency): ~3x faster parse and canonical form
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = [
    "Accepted",
    "Checked",
    "IngestService",
    "IngestWriter",
    "MAX_ENVELOPES",
    "MAX_MESSAGE_BYTES",
    "Outcome",
    "RateLimiter",
    "REASONS",
    "Rejection",
    "ReportUpdate",
    "Submission",
    "Validator",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one MQTT message or HTTP body
MAX_ENVELOPES = 500  # envelopes per message
QUARANTINE_PAYLOAD_BYTES = 64 * 1024
FUTURE_SKEW = timedelta(minutes=5)
REASONS = ("too_large", "malformed_json", "shape", "schema", "unknown_device", "topic_mismatch", "bad_signature",
           "unknown_model_version", "future_timestamp", "rate_limited", "internal")
KINDS = ("summary", "report", "heartbeat")

# Every byte except the four JSON brackets: ``payload.translate(None, _NOT_BRACKETS)`` keeps only brackets.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


# ---- results --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    """A summary that passed every check, ready to store."""

    index: int  # position in its message
    device_id: str
    seq: int
    model: str
    version: str
    start: str  # normalised ...Z
    end: str
    count: int
    body: str  # canonical JSON of the signed summary document
    signatures: str = "[]"  # JSON of the envelope's signatures (to quarantine it whole if rate limited)
    duplicate: bool = False  # already stored when validated (takes no token)

    def envelope(self) -> bytes:
        return f'{{"signed":{self.body},"signatures":{self.signatures}}}'.encode()


@dataclass(frozen=True)
class Rejection:
    """One quarantined document: an envelope (``index``), or a whole message (``index`` None)."""

    index: int | None
    reason: str
    detail: str
    device_id: str | None  # who sent it, as far as known: the MQTT topic's device, else the device claimed
    payload: bytes  # truncated to QUARANTINE_PAYLOAD_BYTES when stored


@dataclass(frozen=True)
class Checked:
    """A summary message after validation: what to store, and what to quarantine (sorted by index)."""

    accepted: list[Accepted]
    rejected: list[Rejection]


@dataclass(frozen=True)
class ReportUpdate:
    device_id: str
    at: datetime
    document: str  # JSON of the report document (Report.to_dict())


@dataclass
class Outcome:
    """What happened to one message, known once its transaction committed (or failed: ``error``)."""

    accepted: int = 0  # summaries newly stored (or a report that became the device's latest)
    duplicates: int = 0  # summaries already stored (or a report not newer than the stored one)
    rejected: list[Rejection] = field(default_factory=list)
    error: str | None = None  # the write failed: nothing of this message was committed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Submission:
    """One message's worth of writes; ``done(outcome)`` runs on the writer thread after commit (or failure)."""

    kind: str
    source: str
    received: float
    summaries: list[Accepted] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    report: ReportUpdate | None = None
    seen: tuple[str, ...] = ()  # devices whose last_seen moves (authenticated summaries, report, heartbeat)
    done: Callable[[Outcome], None] | None = None

    @property
    def rows(self) -> int:
        return len(self.summaries) + len(self.rejections) + (self.report is not None)


def _rejected(reason: str, detail: str) -> RejectedError:
    return RejectedError(reason, detail)


# ---- rate limiting --------------------------------------------------------------------------------------
class RateLimiter:
    """One token bucket per device: ``per_minute`` tokens a minute, bursts of up to ``per_minute``.

    Thread-safe; O(1) per call. ``monotonic`` is injectable for tests.
    """

    def __init__(self, per_minute: int, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("device_rate_per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._monotonic = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)
        self._empty_until: dict[str, float] = {}  # refused devices -> when they have a token again
        self._lock = threading.Lock()

    def _level(self, device_id: str, now: float) -> float:
        tokens, at = self._buckets.get(device_id, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def over_rate(self) -> frozenset[str]:
        """Devices refused a token whose bucket has not refilled to one token yet (takes none).

        A snapshot small enough to hand to a validator process with each message."""
        with self._lock:
            now = self._monotonic()
            for d in [d for d, until in self._empty_until.items() if until <= now]:
                del self._empty_until[d]
            return frozenset(self._empty_until)

    def take(self, device_id: str) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        with self._lock:
            now = self._monotonic()
            tokens = self._level(device_id, now)
            if tokens < 1.0:
                self._buckets[device_id] = (tokens, now)
                self._empty_until[device_id] = now + (1.0 - tokens) / self.rate
                return False
            self._buckets[device_id] = (tokens - 1.0, now)
            return True


# ---- validation -----------------------------------------------------------------------------------------
def _parse_json(payload: bytes, limit: int) -> Any:
    """``canonical.parse_json``'s guarantees (size, UTF-8, depth <= MAX_DEPTH, no NaN/Infinity), faster.

    The nesting pre-scan runs over the brackets only (``bytes.translate`` keeps them), not every character:
    parse_json's per-character loop cost ~130 µs per 5 KB summary here. Raises RejectedError.
    """
    if len(payload) > limit:
        raise _rejected("too_large", f"message is {len(payload)} bytes, over the {limit}-byte limit")
    depth = deepest = 0
    for b in payload.translate(None, _NOT_BRACKETS):
        depth += 1 if b in (0x5B, 0x7B) else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:
                raise _rejected("malformed_json", f"message nests deeper than {MAX_DEPTH} levels")
    if _orjson is not None:
        try:
            return _orjson.loads(payload)  # refuses NaN/Infinity and integers beyond 64 bits by itself
        except _orjson.JSONDecodeError as exc:  # also for invalid UTF-8
            raise _rejected("malformed_json", f"message is not valid UTF-8 JSON: {exc}") from None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _rejected("malformed_json", f"message is not UTF-8: {exc}") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except SchemaError as exc:
        raise _rejected("malformed_json", str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise _rejected("malformed_json", f"message is not valid JSON: {exc}") from None


def _canonical_fast(signed: dict[str, Any]) -> bytes:
    """The canonical bytes of ``signed``, by orjson when it is installed.

    orjson writes the same canonical JSON as ``canonical_bytes`` (sorted keys, no spaces, UTF-8) except for
    some floats (``1e16`` vs ``1e+16``): ``_verify`` falls back to the exact ``canonical_bytes`` whenever
    these bytes do not verify, so a difference costs time, never a wrongly refused or accepted summary.
    """
    if _orjson is not None:
        try:
            return bytes(_orjson.dumps(signed, option=_orjson.OPT_SORT_KEYS))
        except (_orjson.JSONEncodeError, TypeError):
            pass
    return canonical_bytes(signed)


def _no_constant(name: str) -> Any:
    raise SchemaError(f"message contains {name}, which is not valid JSON")


def _claimed_device(doc: Any) -> str | None:
    """The device id a document claims, if it is a valid id (for the quarantine row); never raises."""
    d = doc.get("device_id") if isinstance(doc, dict) else None
    try:
        return check_id(d, "device id") if isinstance(d, str) else None
    except SchemaError:
        return None


def _dump(doc: Any) -> bytes:
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()[:QUARANTINE_PAYLOAD_BYTES]
    except (TypeError, ValueError):
        return repr(doc).encode()[:QUARANTINE_PAYLOAD_BYTES]


def _valid(key: Ed25519PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        key.verify(sig, data)
        return True
    except Exception:  # cryptography's InvalidSignature (and a wrong-length signature)
        return False


@dataclass(frozen=True)
class _DeviceKey:
    key: Ed25519PublicKey
    keyid: str


class Validator:
    """The one validation path (MQTT and HTTP). Thread-safe.

    A device's enrolled key is read from the store once per message (one primary-key look-up), so a
    re-enrolled or removed device takes effect at once, in every validator thread or process; parsed keys
    and published versions are cached (a version is re-read on a miss).
    """

    def __init__(self, settings: ServerSettings, store: Store, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.limiter = RateLimiter(settings.device_rate_per_minute, monotonic=monotonic)
        self._parsed: dict[str, _DeviceKey] = {}  # base64 public key -> parsed key
        self._versions: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()  # .memo: device id -> key, for the message being checked

    # ---- look-ups ---------------------------------------------------------------------------------------
    def _new_message(self) -> None:
        self._local.memo = {}

    def _device_key(self, device_id: str) -> _DeviceKey | None:
        """The device's enrolled key (None when not enrolled), read once per message."""
        memo: dict[str, _DeviceKey | None] | None = getattr(self._local, "memo", None)
        if memo is not None and device_id in memo:
            return memo[device_id]
        row = self.store.one("SELECT public_key FROM devices WHERE device_id = ?", (device_id,))
        entry = None if row is None else self._parse_key(device_id, str(row["public_key"]))
        if memo is not None:
            memo[device_id] = entry
        return entry

    def _parse_key(self, device_id: str, b64: str) -> _DeviceKey | None:
        with self._lock:
            entry = self._parsed.get(b64)
        if entry is None:
            try:
                key = public_from_b64(b64)
            except SchemaError:
                log.error("device %s has an unusable public key in the store; re-enroll it", device_id)
                return None
            entry = _DeviceKey(key, key_id(key))
            with self._lock:
                self._parsed[b64] = entry
        return entry

    def _published(self, model: str, version: str) -> bool:
        with self._lock:
            if (model, version) in self._versions:
                return True
        row = self.store.one("SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (model, version))
        if row is None:
            return False
        with self._lock:
            self._versions.add((model, version))
        return True

    def _known_seqs(self, device_id: str, seqs: list[int]) -> set[int]:
        """Which of ``seqs`` are already stored for the device (one query; duplicates take no token)."""
        found: set[int] = set()
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.store.query(f"SELECT seq FROM summaries WHERE device_id = ? AND seq IN ({marks})",
                                    (device_id, *chunk))
            found.update(int(r[0]) for r in rows)
        return found

    # ---- shared steps -----------------------------------------------------------------------------------
    def _verify(self, device_id: str, signed_bytes: bytes, envelope: dict[str, Any], what: str) -> bytes:
        """The signed bytes that verified (``signed_bytes`` or the exact canonical form). Raises
        RejectedError(bad_signature) unless a signature by the device's enrolled key verifies."""
        try:
            signed, sigs = envelope_signatures(envelope, what)
        except SchemaError as exc:
            raise _rejected("bad_signature", str(exc)) from None
        if not sigs:
            raise _rejected("bad_signature", f"{what} is unsigned: it carries no signature")
        dk = self._device_key(device_id)
        if dk is None:
            raise _rejected("unknown_device", f"device {device_id!r} is not enrolled (any more)")
        for keyid, sig in sigs:
            if keyid != dk.keyid:
                continue
            if _valid(dk.key, sig, signed_bytes):
                return signed_bytes
            exact = canonical_bytes(signed)
            if exact != signed_bytes and _valid(dk.key, sig, exact):
                return exact
            break
        enrolled = short(dk.keyid)
        seen = ", ".join(short(k) for k, _ in sigs)
        raise _rejected("bad_signature", f"{what} is not validly signed by device {device_id}'s enrolled key "
                                         f"{enrolled} (signed by {seen}); re-enroll the device if its key changed")

    def _not_future(self, times: list[tuple[str, datetime]], now: float) -> None:
        limit = datetime.fromtimestamp(now, UTC) + FUTURE_SKEW
        for name, t in times:
            if t > limit:
                raise _rejected("future_timestamp", f"{name} {fmt(t)} is more than {int(FUTURE_SKEW.total_seconds())}"
                                                    f" s ahead of the server clock ({fmt(limit - FUTURE_SKEW)}); "
                                                    "check the device clock")

    def _envelope_shape(self, env: Any, what: str) -> dict[str, Any]:
        if not isinstance(env, dict) or set(env) != {"signed", "signatures"} or not isinstance(env["signed"], dict):
            raise _rejected("shape", f"{what} is not a signed envelope with exactly 'signed' (an object) and "
                                     "'signatures'")
        return env["signed"]

    # ---- summaries --------------------------------------------------------------------------------------
    def validate(self, payload: bytes, *, topic_device: str | None, source: str) -> Checked:
        """Check one summary message (one envelope or a list of them), rate limit included.

        Raises RejectedError (too_large, malformed_json, shape) when the whole message is refused; otherwise
        returns the accepted summaries and the per-envelope rejections (see the module docstring for the order).
        """
        return self.admit(self.precheck(payload, topic_device=topic_device, source=source,
                                         over_rate=self.limiter.over_rate()))

    def precheck(self, payload: bytes, *, topic_device: str | None, source: str,
                 over_rate: frozenset[str] = frozenset()) -> Checked:
        """Every check but taking rate tokens (``admit`` does that, where the buckets are): runs in a
        validator thread or process. ``over_rate`` (devices with an empty bucket) is refused before the
        signature check. Raises RejectedError when the whole message is refused."""
        self._new_message()
        doc = _parse_json(payload, MAX_MESSAGE_BYTES)
        envelopes = doc if isinstance(doc, list) else [doc]
        if not envelopes:
            raise _rejected("shape", "message holds an empty list: send one envelope or a list of 1.."
                                     f"{MAX_ENVELOPES}")
        if len(envelopes) > MAX_ENVELOPES:
            raise _rejected("shape", f"message holds {len(envelopes)} envelopes; at most {MAX_ENVELOPES} per "
                                     "message")
        now = self.clock()
        rejected: list[Rejection] = []
        staged: list[tuple[int, Summary, bytes, dict[str, Any]]] = []
        for i, env in enumerate(envelopes):
            try:
                staged.append((i, *self._check_summary(env, i, topic_device, source)))
            except RejectedError as exc:
                signed = env.get("signed") if isinstance(env, dict) else None
                rejected.append(Rejection(i, exc.reason, str(exc), topic_device or _claimed_device(signed),
                                          _dump(env)))
        by_device: dict[str, list[int]] = {}
        for _, s, _, _ in staged:
            by_device.setdefault(s.device_id, []).append(s.seq)
        stored = {d: self._known_seqs(d, seqs) for d, seqs in by_device.items()}
        accepted: list[Accepted] = []
        for i, s, signed_bytes, env in staged:
            what = f"summary [{i}] ({s.device_id} seq {s.seq})"
            duplicate = s.seq in stored[s.device_id]
            try:
                if not duplicate and s.device_id in over_rate:
                    raise self._over_rate(s.device_id)
                signed_bytes = self._verify(s.device_id, signed_bytes, env, what)
                if not self._published(s.model, s.version):
                    raise _rejected("unknown_model_version", f"{what}: model {s.model} version {s.version} is not "
                                                             "published; publish it before its devices report")
                start, end = parse(s.start, "window.start"), parse(s.end, "window.end")
                self._not_future([(f"{what}: window.start", start), (f"{what}: window.end", end)], now)
            except RejectedError as exc:
                rejected.append(Rejection(i, exc.reason, str(exc), topic_device or s.device_id, _dump(env)))
                continue
            sigs = json.dumps(env["signatures"], separators=(",", ":"))
            accepted.append(Accepted(i, s.device_id, s.seq, s.model, s.version, fmt(start), fmt(end), s.count,
                                     signed_bytes.decode(), sigs, duplicate))
        rejected.sort(key=lambda r: r.index or 0)
        return Checked(accepted, rejected)

    def admit(self, checked: Checked) -> Checked:
        """Take one token per new (not already stored) summary; refuse the rest as ``rate_limited``."""
        accepted: list[Accepted] = []
        rejected = list(checked.rejected)
        for a in checked.accepted:
            if a.duplicate or self.limiter.take(a.device_id):
                accepted.append(a)
            else:
                exc = self._over_rate(a.device_id)
                rejected.append(Rejection(a.index, exc.reason, str(exc), a.device_id, a.envelope()))
        rejected.sort(key=lambda r: r.index or 0)
        return Checked(accepted, rejected)

    def _over_rate(self, device_id: str) -> RejectedError:
        return _rejected("rate_limited", f"device {device_id} is over {self.settings.device_rate_per_minute} "
                                         "summaries a minute; send fewer, larger windows (or raise "
                                         "device_rate_per_minute)")

    def _check_summary(self, env: Any, i: int, topic_device: str | None,
                       source: str) -> tuple[Summary, bytes, dict[str, Any]]:
        what = f"summary [{i}]"
        signed = self._envelope_shape(env, what)
        signed_bytes = _canonical_fast(signed)  # the bytes the device signed (see _verify)
        if len(signed_bytes) > self.settings.max_summary_bytes:
            raise _rejected("too_large", f"{what} is {len(signed_bytes)} bytes, over the "
                                         f"{self.settings.max_summary_bytes}-byte summary limit")
        try:
            s = Summary.from_dict(signed)
        except ContractError as exc:
            raise _rejected("schema", f"{what}: {exc}") from None
        if self._device_key(s.device_id) is None:
            raise _rejected("unknown_device", f"{what}: device {s.device_id!r} is not enrolled; enroll it "
                                              "(`fleet-server devices enroll`) before it reports")
        if source == "mqtt" and topic_device != s.device_id:
            raise _rejected("topic_mismatch", f"{what} is for device {s.device_id!r} but came on the topic of "
                                              f"device {topic_device!r}")
        return s, signed_bytes, env

    # ---- reports and heartbeats -------------------------------------------------------------------------
    def validate_report(self, payload: bytes, *, topic_device: str | None, source: str) -> ReportUpdate:
        """Check a signed report envelope. Raises RejectedError with the same reasons as summaries."""
        self._new_message()
        env = _parse_json(payload, MAX_MESSAGE_BYTES)
        signed = self._envelope_shape(env, "report")
        signed_bytes = _canonical_fast(signed)
        if len(signed_bytes) > self.settings.max_summary_bytes:
            raise _rejected("too_large", f"report is {len(signed_bytes)} bytes, over the "
                                         f"{self.settings.max_summary_bytes}-byte limit")
        try:
            r = Report.from_dict(signed)
        except ContractError as exc:
            raise _rejected("schema", str(exc)) from None
        if self._device_key(r.device_id) is None:
            raise _rejected("unknown_device", f"report: device {r.device_id!r} is not enrolled")
        if source == "mqtt" and topic_device != r.device_id:
            raise _rejected("topic_mismatch", f"report is for device {r.device_id!r} but came on the topic of "
                                              f"device {topic_device!r}")
        self._verify(r.device_id, signed_bytes, env, f"report of {r.device_id}")
        at = parse(r.at, "report.at")
        self._not_future([("report.at", at)], self.clock())
        return ReportUpdate(r.device_id, at, json.dumps(r.to_dict(), sort_keys=True, separators=(",", ":")))

    def validate_heartbeat(self, payload: bytes, *, topic_device: str | None) -> str:
        """The enrolled device a heartbeat is from. Raises RejectedError (heartbeats are unsigned)."""
        self._new_message()
        doc = _parse_json(payload, 4096)
        if not isinstance(doc, dict) or not isinstance(doc.get("device_id"), str):
            raise _rejected("shape", "heartbeat must be an object with a string device_id")
        try:
            device_id = check_id(doc["device_id"], "heartbeat.device_id")
        except SchemaError as exc:
            raise _rejected("schema", str(exc)) from None
        if self._device_key(device_id) is None:
            raise _rejected("unknown_device", f"heartbeat: device {device_id!r} is not enrolled")
        if topic_device is not None and topic_device != device_id:
            raise _rejected("topic_mismatch", f"heartbeat is for device {device_id!r} but came on the topic of "
                                              f"device {topic_device!r}")
        return device_id

    def check(self, kind: str, payload: bytes, *, topic_device: str | None, source: str,
              over_rate: frozenset[str] = frozenset()) -> Submission:
        """Stage one (any thread or validator process): validate a message of ``kind`` into a Submission for
        the writer, taking no rate tokens (``admit_submission`` does). Never raises: a refused message
        becomes a Submission holding its quarantine row."""
        sub = Submission(kind, source, self.clock())
        try:
            if kind == "summary":
                checked = self.precheck(payload, topic_device=topic_device, source=source, over_rate=over_rate)
                sub.summaries, sub.rejections = checked.accepted, checked.rejected
            elif kind == "report":
                sub.report = self.validate_report(payload, topic_device=topic_device, source=source)
                sub.seen = (sub.report.device_id,)
            elif kind == "heartbeat":
                sub.seen = (self.validate_heartbeat(payload, topic_device=topic_device),)
            else:
                raise _rejected("shape", f"unknown message kind {kind!r}; known: {', '.join(KINDS)}")
        except RejectedError as exc:
            sub.rejections = [Rejection(None, exc.reason, str(exc), topic_device, payload[:QUARANTINE_PAYLOAD_BYTES])]
        except Exception as exc:  # a bug must not stop ingestion: quarantine the message and say so
            log.exception("validating a %s message failed unexpectedly", kind)
            sub.summaries, sub.report, sub.seen = [], None, ()
            sub.rejections = [Rejection(None, "internal", f"server error while validating: {exc!r}", topic_device,
                                        payload[:QUARANTINE_PAYLOAD_BYTES])]
        return sub

    def admit_submission(self, sub: Submission) -> Submission:
        """Stage two (where the rate buckets are): take tokens for the new summaries of ``sub``."""
        if sub.kind == "summary" and sub.summaries:
            checked = self.admit(Checked(sub.summaries, sub.rejections))
            sub.summaries, sub.rejections = checked.accepted, checked.rejected
            sub.seen = tuple(sorted({a.device_id for a in checked.accepted}))
        return sub


# ---- counters -------------------------------------------------------------------------------------------
class IngestCounters:
    """Thread-safe ingest counters and their Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = dict.fromkeys(KINDS, 0)  # summary envelopes (a refused message counts 1), reports, beats
        self.stored = 0  # summaries newly stored
        self.duplicates = 0  # summaries already stored (acknowledged, ignored)
        self.reports_stored = 0
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.batches = 0
        self.write_errors = 0

    def add_received(self, kind: str, n: int) -> None:
        with self._lock:
            self.received[kind] = self.received.get(kind, 0) + n

    def add_committed(self, outcomes: list[tuple[Submission, Outcome]]) -> None:
        with self._lock:
            self.batches += 1
            for sub, out in outcomes:
                if sub.kind == "report":
                    self.reports_stored += out.accepted
                else:
                    self.stored += out.accepted
                    self.duplicates += out.duplicates
                for r in out.rejected:
                    self.rejected[r.reason] = self.rejected.get(r.reason, 0) + 1

    def add_write_error(self) -> None:
        with self._lock:
            self.write_errors += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"received": dict(self.received), "stored": self.stored, "duplicates": self.duplicates,
                    "reports_stored": self.reports_stored, "rejected": dict(self.rejected),
                    "batches": self.batches, "write_errors": self.write_errors}

    def prometheus(self, queue_depth: int) -> str:
        c = self.snapshot()
        lines = [
            "# HELP edgefleet_ingest_received_total Documents received (summary envelopes, reports, heartbeats).",
            "# TYPE edgefleet_ingest_received_total counter",
            *(f'edgefleet_ingest_received_total{{kind="{k}"}} {v}' for k, v in c["received"].items()),
            "# HELP edgefleet_ingest_stored_total Summaries durably stored (committed).",
            "# TYPE edgefleet_ingest_stored_total counter",
            f"edgefleet_ingest_stored_total {c['stored']}",
            "# HELP edgefleet_ingest_duplicates_total Summaries already stored: acknowledged and ignored.",
            "# TYPE edgefleet_ingest_duplicates_total counter",
            f"edgefleet_ingest_duplicates_total {c['duplicates']}",
            "# HELP edgefleet_ingest_reports_stored_total Device reports that became the device's latest.",
            "# TYPE edgefleet_ingest_reports_stored_total counter",
            f"edgefleet_ingest_reports_stored_total {c['reports_stored']}",
            "# HELP edgefleet_ingest_rejected_total Documents quarantined, by reason.",
            "# TYPE edgefleet_ingest_rejected_total counter",
            *(f'edgefleet_ingest_rejected_total{{reason="{r}"}} {v}' for r, v in c["rejected"].items()),
            "# HELP edgefleet_ingest_batches_total Write transactions committed.",
            "# TYPE edgefleet_ingest_batches_total counter",
            f"edgefleet_ingest_batches_total {c['batches']}",
            "# HELP edgefleet_ingest_write_errors_total Write transactions that failed after retries.",
            "# TYPE edgefleet_ingest_write_errors_total counter",
            f"edgefleet_ingest_write_errors_total {c['write_errors']}",
            "# HELP edgefleet_ingest_queue_depth Messages received and not yet committed.",
            "# TYPE edgefleet_ingest_queue_depth gauge",
            f"edgefleet_ingest_queue_depth {queue_depth}",
        ]
        return "\n".join(lines) + "\n"


# ---- the writer -----------------------------------------------------------------------------------------
_INSERT_SUMMARY = ("INSERT OR IGNORE INTO summaries (device_id, seq, model, version, window_start, window_end, count,"
                   " body, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_QUARANTINE = ("INSERT INTO quarantine (received, source, device_id, reason, detail, payload)"
                      " VALUES (?, ?, ?, ?, ?, ?)")
_MAX_DETAIL = 2000


class IngestWriter:
    """One thread that commits submissions in batches and then runs their ``done`` callbacks.

    A transaction holds up to ``settings.ingest_batch`` rows (summaries, quarantine rows, reports); a single
    submission is never split. A failing transaction is retried ``retries`` times with backoff; if it still
    fails, each callback gets ``Outcome(error=...)`` (nothing was committed, so nothing may be acknowledged).
    """

    def __init__(self, settings: ServerSettings, store: Store, *, counters: IngestCounters | None = None,
                 retries: int = 3) -> None:
        self.settings = settings
        self.store = store
        self.counters = counters or IngestCounters()
        self.retries = retries
        self._queue: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0  # submitted, callback not yet run
        self._accepting = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
            self._thread.start()

    def submit(self, sub: Submission) -> None:
        """Queue a submission (never blocks). After ``stop()`` its callback gets an error at once."""
        with self._cond:
            accepting = self._accepting
            if accepting:
                self._pending += 1
        if not accepting:
            self._finish(sub, Outcome(rejected=[], error="ingest writer is stopped"))
            return
        n = len(sub.summaries) + len(sub.rejections) if sub.kind == "summary" else 1
        self.counters.add_received(sub.kind, n)
        self._queue.put(sub)

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until every submitted callback ran; returns whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Commit what is queued (bounded by ``timeout``), then end the thread. Returns whether it ended."""
        with self._cond:
            thread, self._accepting = self._thread, False
        if thread is None:
            return True
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            log.error("ingest writer did not finish within %.1f s; %d messages not committed", timeout, self.pending)
            return False
        with self._cond:
            self._thread = None
        return True

    # ---- thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        carry: Submission | None = None  # taken from the queue but over the previous batch's row limit
        while not stopping or carry is not None:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                break
            batch, rows = [first], first.rows
            while rows < self.settings.ingest_batch and not stopping:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                elif rows + nxt.rows > self.settings.ingest_batch:
                    carry = nxt
                    break
                else:
                    batch.append(nxt)
                    rows += nxt.rows
            self._commit(batch)

    def _commit(self, batch: list[Submission]) -> None:
        error: str | None = None
        outcomes: list[Outcome] = []
        for attempt in range(self.retries + 1):
            try:
                outcomes = self._write(batch)
                error = None
                break
            except Exception as exc:  # sqlite3 errors, disk full: retry, then fail the callbacks (no ack)
                error = f"store write failed: {exc!r}"
                log.warning("ingest batch of %d messages failed (attempt %d): %s", len(batch), attempt + 1, exc)
                time.sleep(min(1.0, 0.05 * 2 ** attempt))
        if error is not None:
            self.counters.add_write_error()
            outcomes = [Outcome(error=error) for _ in batch]
        else:
            self.counters.add_committed(list(zip(batch, outcomes, strict=True)))
        for sub, out in zip(batch, outcomes, strict=True):
            self._finish(sub, out)
            with self._cond:
                self._pending -= 1
                if not self._pending:
                    self._cond.notify_all()

    @staticmethod
    def _finish(sub: Submission, out: Outcome) -> None:
        if sub.done is None:
            return
        try:
            sub.done(out)
        except Exception:
            log.exception("an ingest completion callback failed")

    def _write(self, batch: list[Submission]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        seen: dict[str, float] = {}
        with self.store.write() as c:
            for sub in batch:
                out = Outcome(rejected=list(sub.rejections))
                if sub.summaries:
                    cur = c.executemany(_INSERT_SUMMARY, [
                        (a.device_id, a.seq, a.model, a.version, a.start, a.end, a.count, a.body, sub.received)
                        for a in sub.summaries])
                    out.accepted = max(cur.rowcount, 0)
                    out.duplicates = len(sub.summaries) - out.accepted
                if sub.rejections:
                    c.executemany(_INSERT_QUARANTINE, [
                        (sub.received, sub.source, r.device_id, r.reason, r.detail[:_MAX_DETAIL],
                         r.payload[:QUARANTINE_PAYLOAD_BYTES]) for r in sub.rejections])
                if sub.report is not None:
                    if self._store_report(c, sub.report):
                        out.accepted = 1
                    else:
                        out.duplicates = 1
                for d in sub.seen:
                    seen[d] = max(seen.get(d, 0.0), sub.received)
                outcomes.append(out)
            if seen:
                c.executemany("UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE device_id = ?",
                              [(t, d) for d, t in seen.items()])
        return outcomes

    @staticmethod
    def _store_report(c: Any, report: ReportUpdate) -> bool:
        row = c.execute("SELECT reported FROM devices WHERE device_id = ?", (report.device_id,)).fetchone()
        if row is None:
            return False
        if row["reported"]:
            try:
                current: datetime | None = parse(json.loads(row["reported"]).get("at"), "reported.at")
            except (ValueError, AttributeError, SchemaError):
                current = None  # unreadable: replace it
            # Strictly older only: reports carry second-resolution times, and several state changes often fall in
            # one second; MQTT keeps one device's messages on one topic in order, so the later arrival is newer.
            if current is not None and report.at < current:
                return False
        c.execute("UPDATE devices SET reported = ? WHERE device_id = ?", (report.document, report.device_id))
        return True


# ---- the service ----------------------------------------------------------------------------------------
class IngestSource:
    """What a message source (the MQTT subscriber) offers the service: bounded start, pause, stop."""

    def start(self, timeout: float) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def pause(self) -> None:  # pragma: no cover - interface
        """Stop handing over new messages (unacknowledged ones are delivered again later)."""
        raise NotImplementedError

    def stop(self, timeout: float) -> bool:  # pragma: no cover - interface
        """Send what is owed (acknowledgements of committed messages), then disconnect."""
        raise NotImplementedError


_Item = tuple[str, bytes, str | None, str, Callable[[Outcome], None] | None]
_DISPATCH_MAX = 16  # messages per round trip to a validator process
_DISPATCH_BYTES = 1024 * 1024


class IngestService:
    """Validators + the writer (+ sources such as the MQTT subscriber), started and stopped together.

    ``submit()`` never blocks. Validation (stage one: JSON, schema, signature, look-ups) runs either on
    ``validator_threads`` threads, or, with ``validator_processes > 0``, in that many worker processes: the
    checks are pure Python and hold the GIL, so threads cannot use a second core, processes can. Rate tokens
    are then taken here (stage two), the writer commits, and ``done`` runs. Injected clocks apply to
    thread validation only (worker processes use the system clock). A validator process that dies (OOM
    killer) is replaced; the messages it held are validated here instead, so none is lost.
    """

    def __init__(self, settings: ServerSettings, store: Store, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, validator_threads: int = 1,
                 validator_processes: int = 0) -> None:
        self.settings = settings
        self.store = store
        self.counters = IngestCounters()
        self.validator = Validator(settings, store, clock=clock, monotonic=monotonic)
        self.writer = IngestWriter(settings, store, counters=self.counters)
        self.sources: list[IngestSource] = []
        self._n_threads = max(1, validator_threads)
        self._n_processes = max(0, validator_processes)
        self._workers: list[_ValidatorProcess] = []
        self._room = threading.Condition()  # guards _workers; notified when a worker finishes a batch
        self._inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepting = False
        self._inbox_depth = 0

    def add_source(self, source: IngestSource) -> None:
        self.sources.append(source)

    @property
    def running(self) -> bool:
        return self._accepting

    def start(self, timeout: float = 10.0) -> bool:
        """Start the writer and validators, then the sources; returns whether every source came up in time
        (a source that did not keeps trying in the background). Raises RuntimeError when a validator process
        cannot start."""
        with self._lock:
            if self._accepting:
                return True
            self.writer.start()
            if self._n_processes:
                with self._room:
                    self._workers = [self._spawn(timeout) for _ in range(self._n_processes)]
                self._threads = [threading.Thread(target=self._dispatch_loop, name="ingest-dispatch", daemon=True)]
            else:
                self._threads = [threading.Thread(target=self._validate_loop, name=f"ingest-validate-{i}",
                                                  daemon=True) for i in range(self._n_threads)]
            for t in self._threads:
                t.start()
            self._accepting = True
        return all([s.start(timeout) for s in self.sources])

    def worker_pids(self) -> list[int]:
        """PIDs of the live validator processes (empty in thread mode)."""
        with self._room:
            return [w.pid for w in self._workers if w.alive]

    def submit(self, kind: str, payload: bytes, *, topic_device: str | None, source: str,
               done: Callable[[Outcome], None] | None = None) -> None:
        """Hand a message over (thread-safe, never blocks). ``done(outcome)`` runs after its commit."""
        with self._lock:
            accepting = self._accepting
            if accepting:
                self._inbox_depth += 1
        if not accepting:
            if done is not None:
                done(Outcome(error="ingest is not running"))
            return
        self._inbox.put((kind, payload, topic_device, source, done))

    def _validate_loop(self) -> None:
        """Thread mode: validate here, then hand over to the writer."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            self._finish(item, None)

    def _finish(self, item: _Item, sub: Submission | None) -> None:
        """Stage two: take rate tokens, attach the callback, queue for the writer. Validates first when
        stage one has not run (``sub`` None)."""
        kind, payload, topic_device, source, done = item
        if sub is None:
            sub = self.validator.check(kind, payload, topic_device=topic_device, source=source,
                                       over_rate=self.validator.limiter.over_rate())
        sub.done = done
        self.writer.submit(self.validator.admit_submission(sub))
        with self._lock:
            self._inbox_depth -= 1

    # ---- process mode -----------------------------------------------------------------------------------
    def _spawn(self, timeout: float) -> _ValidatorProcess:
        return _ValidatorProcess(self.settings, self._validated, timeout)

    def _dispatch_loop(self) -> None:
        """Send messages to the validator processes in small batches (one round trip per batch, not per
        message), to the least busy process, keeping at most two batches queued per process so that the
        next batch grows while they work."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            worker = self._idle_worker()
            batch, size = [item], len(item[1])
            want = max(1, min(_DISPATCH_MAX, (self._inbox.qsize() + 1) // max(1, self._n_processes)))
            stop = False
            while len(batch) < want and size < _DISPATCH_BYTES:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                size += len(nxt[1])
            if worker is None or not worker.send(batch, self.validator.limiter.over_rate()):
                for it in batch:  # no live validator process (or it just died): validate here
                    self._finish(it, None)
            if stop:
                return

    def _idle_worker(self) -> _ValidatorProcess | None:
        """The live worker with the fewest batches queued, waiting (bounded) while all have two; None when no
        worker is alive."""
        deadline = time.monotonic() + 5.0
        with self._room:
            while True:
                live = [w for w in self._workers if w.alive]
                if not live:
                    return None
                best = min(live, key=lambda w: w.load)
                if best.load < 2 or time.monotonic() > deadline:
                    return best
                self._room.wait(0.05)

    def _validated(self, worker: _ValidatorProcess, batch: list[_Item], subs: list[Submission] | None,
                   error: str | None) -> None:
        """A batch came back from a validator process (on that worker's reader thread), or the process died
        holding it (``subs`` None): then validate here and replace the process."""
        if subs is None:
            log.error("validator process %d failed (%s); validating its %d messages here", worker.pid, error,
                      len(batch))
            self._replace(worker)
            for item in batch:
                self._finish(item, None)
        else:
            for item, sub in zip(batch, subs, strict=True):
                self._finish(item, sub)
        with self._room:
            self._room.notify_all()

    def _replace(self, dead: _ValidatorProcess) -> None:
        with self._room:
            if dead not in self._workers or not self._accepting:
                return
            self._workers.remove(dead)
        try:
            fresh = self._spawn(30.0)
        except Exception:
            log.exception("cannot start a new validator process; validating in-process instead")
            return
        with self._room:
            self._workers.append(fresh)
            self._room.notify_all()

    def ingest(self, payload: bytes, *, kind: str = "summary", source: str = "http", topic_device: str | None = None,
               timeout: float = 30.0) -> Outcome:
        """Submit and wait for the commit (blocking helper for tools and tests)."""
        box: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.submit(kind, payload, topic_device=topic_device, source=source, done=box.put)
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            return Outcome(error=f"not committed within {timeout} s")

    def queue_depth(self) -> int:
        with self._lock:
            inbox = self._inbox_depth
        return inbox + self.writer.pending

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until everything submitted so far is committed and its callback ran."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                inbox = self._inbox_depth
            if not inbox and self.writer.flush(0):
                return True
            if inbox:
                time.sleep(0.005)
            else:
                self.writer.flush(max(0.0, deadline - time.monotonic()))
        return self.queue_depth() == 0

    def stop(self, timeout: float = 10.0) -> bool:
        """Pause the sources, commit everything received (acknowledging it), stop the sources, then the
        threads. Bounded by about ``timeout``; returns whether everything stopped cleanly."""
        deadline = time.monotonic() + timeout
        for s in self.sources:
            s.pause()
        flushed = self.flush(max(0.1, timeout * 0.6))
        ok = all([s.stop(max(0.1, deadline - time.monotonic())) for s in self.sources])
        with self._lock:
            self._accepting = False
            threads, self._threads = self._threads, []
        for _ in threads:
            self._inbox.put(None)
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        with self._room:
            workers, self._workers = self._workers, []
        for w in workers:
            ok = w.close(max(0.5, deadline - time.monotonic())) and ok
        ok = self.writer.stop(max(0.1, deadline - time.monotonic())) and ok
        return flushed and ok and not any(t.is_alive() for t in threads)

    def metrics(self) -> str:
        """Prometheus text of the ingest counters (appended to ``ctx.metrics``)."""
        return self.counters.prometheus(self.queue_depth())


# ---- validator processes --------------------------------------------------------------------------------
class _ValidatorProcess:
    """One spawned validator process (never forked: the server has threads) with its own pipe.

    Each process has its own pipe, so a process that dies is seen at once as EOF on exactly that pipe, even
    mid-message (concurrent.futures' shared result queue can block forever on a half-written result of a
    killed worker). Batches are answered in order; a reader thread hands each answer to ``on_done``.
    """

    def __init__(self, settings: ServerSettings,
                 on_done: Callable[[_ValidatorProcess, list[_Item], list[Submission] | None, str | None], None],
                 timeout: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, settings, os.getpid()),
                                   name="ingest-validator", daemon=True)
        self.process.start()
        child.close()  # only the worker holds its end now: its death is EOF here
        self._on_done = on_done
        self._lock = threading.Lock()
        self._pending: collections.deque[list[_Item]] = collections.deque()
        self.alive = True
        try:
            ready = self._conn.poll(timeout) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise RuntimeError(f"validator process {self.pid} did not start within {timeout:g} s")
        self._reader = threading.Thread(target=self._read, name=f"ingest-validator-{self.pid}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._pending)

    def send(self, batch: list[_Item], over_rate: frozenset[str]) -> bool:
        """Queue a batch (called by the one dispatcher thread). False when the process is gone; if it dies
        after this, ``on_done`` gets the batch back with an error."""
        work = [(kind, payload, topic_device, source) for kind, payload, topic_device, source, _ in batch]
        with self._lock:
            if not self.alive:
                return False
            self._pending.append(batch)
        # Not under the lock: the reader must keep draining answers. If it died, the reader sees EOF and
        # returns every pending batch, this one included.
        with contextlib.suppress(OSError, ValueError):
            self._conn.send((work, over_rate))
        return True

    def _read(self) -> None:
        error = "exited"
        while True:
            try:
                subs = self._conn.recv()
            except (EOFError, OSError) as exc:
                error = f"exited ({type(exc).__name__})"
                break
            with self._lock:
                batch = self._pending.popleft()
            self._on_done(self, batch, subs, None)
        with self._lock:
            self.alive = False
            left = list(self._pending)
            self._pending.clear()
        for batch in left:
            self._on_done(self, batch, None, f"validator process {self.pid} {error}")

    def close(self, timeout: float) -> bool:
        """Ask the process to exit (after the batches it holds), wait (bounded), else kill it by PID."""
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self.process.join(timeout)
        clean = not self.process.is_alive()
        self._kill()
        self._reader.join(2.0)
        self._conn.close()
        return clean

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)


def _worker_main(conn: Any, settings: ServerSettings, parent: int) -> None:
    """A validator process: answers each batch of messages with their Submissions, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops its workers

    def orphan_watch() -> None:  # a SIGKILLed server closes no pipe we would notice while busy: do not linger
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()
    validator = Validator(settings, Store(settings.db_path))
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        work, over_rate = msg
        conn.send([validator.check(kind, payload, topic_device=topic_device, source=source, over_rate=over_rate)
                   for kind, payload, topic_device, source in work])
