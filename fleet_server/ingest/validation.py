"""The one validation path (MQTT and HTTP) for summaries, reports and heartbeats; see the package docstring
for the checks, their order and their reason tokens."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from edgefleet_contracts.canonical import canonical_bytes
from edgefleet_contracts.errors import ContractError, SchemaError
from edgefleet_contracts.report import Report
from edgefleet_contracts.signing import envelope_signatures, short
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.timeutil import fmt, parse
from edgefleet_contracts.topics import check_id

from ..errors import RejectedError
from ..settings import ServerSettings
from ..store import Store
from . import fastpath
from .lookups import StoreLookups
from .parsing import canonical_fast, claimed_device, compact_json, dump, parse_json
from .ratelimit import RateLimiter
from .results import (
    FUTURE_SKEW,
    KINDS,
    MAX_ENVELOPES,
    MAX_MESSAGE_BYTES,
    QUARANTINE_PAYLOAD_BYTES,
    Accepted,
    Checked,
    Rejection,
    ReportUpdate,
    Submission,
    reject,
)

__all__ = ["Validator"]

log = logging.getLogger(__name__)


# One message to validate: (kind, payload, topic device, source).
Work = tuple[str, bytes, str | None, str]


class _Head(NamedTuple):
    """What the later checks and the store need of a summary that passed the schema check."""

    device_id: str
    seq: int
    model: str
    version: str
    start: str
    end: str
    predictions: int  # the window's count


class _Staged(NamedTuple):
    """A summary that passed the checks before its signature (by the full path or the fast path)."""

    position: int  # in the message
    head: _Head
    signed_bytes: bytes  # the bytes to verify first: canonical (full path) or as received (fast path)
    span: tuple[int, int] | None  # where ``signed_bytes`` lie in the message (fast path)
    signatures: Callable[[str], list[tuple[str, bytes]]]  # (keyid, signature); RejectedError if malformed
    exact: Callable[[], bytes]  # the canonical form, tried when ``signed_bytes`` does not verify
    envelope: Callable[[], bytes]  # the envelope, for the quarantine
    signatures_json: Callable[[], str]

# A wire timestamp already in the normalised form fmt() writes (then it is its own normalised form).
_NORMAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")  # ASCII digits only


class Validator(StoreLookups):
    """The one validation path (MQTT and HTTP). Thread-safe. What it reads from the store, and when, is
    ``StoreLookups``."""

    def __init__(self, settings: ServerSettings, store: Store, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(store)
        self.settings = settings
        self.clock = clock
        self.limiter = RateLimiter(settings.device_rate_per_minute,
                                   quarantine_per_minute=settings.rate_limited_quarantine_per_minute,
                                   monotonic=monotonic)

    def _stored_seq(self, head: _Head) -> _Head:
        """``head`` with the seq its summary is stored at: the device's seq plus its generation's ``seq_base``
        (``devices._enroll_in``)."""
        base = self._seq_base(head.device_id)
        return head._replace(seq=head.seq + base) if base else head

    # ---- shared steps -----------------------------------------------------------------------------------
    def _verify(self, device_id: str, signed_bytes: bytes, signatures: list[tuple[str, bytes]],
                exact: Callable[[], bytes], what: str) -> bytes:
        """The signed bytes that verified (``signed_bytes`` or ``exact()``, the canonical form). Raises
        RejectedError(bad_signature) unless a signature by the device's enrolled key verifies."""
        if not signatures:
            raise reject("bad_signature", f"{what} is unsigned: it carries no signature")
        dk = self._device_key(device_id)
        if dk is None:
            raise self._not_enrolled(device_id, what)
        for keyid, sig in signatures:
            if keyid != dk.keyid:
                continue
            if dk.verify(sig, signed_bytes):
                return signed_bytes
            canonical = exact()
            if canonical != signed_bytes and dk.verify(sig, canonical):
                return canonical
            break
        enrolled = short(dk.keyid)
        if any(keyid == dk.keyid for keyid, _ in signatures):  # the right key's signature, over other bytes
            raise reject("bad_signature", f"{what} carries a signature by device {device_id}'s enrolled key "
                                          f"{enrolled} that does not verify: the document was changed after it "
                                          "was signed, or the signature is damaged")
        seen = ", ".join(short(k) for k, _ in signatures)
        raise reject("bad_signature", f"{what} is not signed by device {device_id}'s enrolled key {enrolled} "
                                      f"(signed by {seen}); re-enroll the device if its key changed")

    @staticmethod
    def _envelope_signatures(envelope: dict[str, Any], what: str) -> list[tuple[str, bytes]]:
        try:
            return envelope_signatures(envelope, what)[1]
        except SchemaError as exc:
            raise reject("bad_signature", str(exc)) from None

    def _not_future(self, times: list[tuple[str, datetime]], now: float) -> None:
        limit = datetime.fromtimestamp(now, UTC) + FUTURE_SKEW
        for name, t in times:
            if t > limit:
                raise reject("future_timestamp", f"{name} {fmt(t)} is more than {int(FUTURE_SKEW.total_seconds())}"
                                                 f" s ahead of the server clock ({fmt(limit - FUTURE_SKEW)}); "
                                                 "check the device clock")

    def _envelope_shape(self, env: Any, what: str) -> dict[str, Any]:
        if not isinstance(env, dict) or set(env) != {"signed", "signatures"} or not isinstance(env["signed"], dict):
            raise reject("shape", f"{what} is not a signed envelope with exactly 'signed' (an object) and "
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
        self._new_batch([topic_device] if topic_device else [])
        staged, rejected = self._stage(payload, topic_device, source)
        stored = self._stored([(x.head.device_id, x.head.seq) for x in staged])
        checked = self._settle(staged, rejected, stored, topic_device, over_rate, self.clock())
        Submission("summary", source, 0.0, checked.accepted).resolve(payload)
        return checked

    def _stage(self, payload: bytes, topic_device: str | None,
               source: str) -> tuple[list[_Staged], list[Rejection]]:
        """The checks before the signature, for every envelope of a message (cheapest first): the fast path
        when it can decide, else the full path. Raises RejectedError when the whole message is refused."""
        fast = self._stage_fast(payload, topic_device, source)
        if fast is not None:
            return fast
        doc = parse_json(payload, MAX_MESSAGE_BYTES)
        envelopes = doc if isinstance(doc, list) else [doc]
        if not envelopes:
            raise reject("shape", "message holds an empty list: send one envelope or a list of 1.."
                                  f"{MAX_ENVELOPES}")
        if len(envelopes) > MAX_ENVELOPES:
            raise reject("shape", f"message holds {len(envelopes)} envelopes; at most {MAX_ENVELOPES} per "
                                  "message")
        rejected: list[Rejection] = []
        staged: list[_Staged] = []
        for i, env in enumerate(envelopes):
            try:
                staged.append(self._check_summary(env, i, topic_device, source))
            except RejectedError as exc:
                signed = env.get("signed") if isinstance(env, dict) else None
                rejected.append(Rejection(i, exc.reason, str(exc), topic_device or claimed_device(signed),
                                          dump(env)))
        return staged, rejected

    def _stage_fast(self, payload: bytes, topic_device: str | None,
                    source: str) -> tuple[list[_Staged], list[Rejection]] | None:
        """``_stage`` by ``fastpath`` (decode and schema in one pass, the signed bytes as received), or None
        when anything is unusual: then the full path decides (and names the problem)."""
        if len(payload) > MAX_MESSAGE_BYTES or not payload.startswith((b'[{"signed":', b'{"signed":')):
            return None
        envelopes = fastpath.decode(payload)
        if envelopes is None or not 0 < len(envelopes) <= MAX_ENVELOPES:
            return None
        spans = fastpath.signed_spans(payload, envelopes)
        if spans is None:
            return None
        heads: list[_Head] = []
        for env, (a, b) in zip(envelopes, spans, strict=True):
            s = env.signed
            if b - a > self.settings.max_summary_bytes:
                return None
            heads.append(_Head(s.device_id, s.seq, s.model.name, s.model.version, s.window.start, s.window.end,
                               s.window.count))
        staged: list[_Staged] = []
        rejected: list[Rejection] = []
        for i, (env, head, (a, b)) in enumerate(zip(envelopes, heads, spans, strict=True)):
            signed_bytes = payload[a:b]
            item = _Staged(i, head, signed_bytes, (a, b), *fastpath.on_demand(env, signed_bytes))
            try:
                self._check_sender(head.device_id, f"summary [{i}]", topic_device, source)
            except RejectedError as exc:
                rejected.append(Rejection(i, exc.reason, str(exc), topic_device or head.device_id,
                                          item.envelope()))
                continue
            staged.append(item._replace(head=self._stored_seq(head)))
        return staged, rejected

    def _settle(self, staged: list[_Staged], rejected: list[Rejection], stored: set[tuple[str, int]],
                topic_device: str | None, over_rate: frozenset[str], now: float, horizon: str | None = None) -> Checked:
        """The signature, model-version and timestamp checks of staged summaries (``stored``: which are
        already stored, so duplicates; ``horizon``: the latest acceptable window time, normalised)."""
        accepted: list[Accepted] = []
        if horizon is None:
            horizon = _horizon(now)
        for i, s, received, span, signatures, exact, envelope, signatures_json in staged:
            duplicate = (s.device_id, s.seq) in stored
            try:
                if not duplicate and s.device_id in over_rate:
                    raise self._over_rate(s.device_id)
                what = f"summary [{i}] ({s.device_id} seq {s.seq})"
                signed_bytes = self._verify(s.device_id, received, signatures(what), exact, what)
                if not self._published(s.model, s.version):
                    raise reject("unknown_model_version", f"{what}: model {s.model} version {s.version} is not "
                                                          "published; publish it before its devices report")
                start, end = s.start, s.end
                if not (_NORMAL_TIME.fullmatch(start) and _NORMAL_TIME.fullmatch(end)
                        and start <= horizon and end <= horizon):
                    t0, t1 = parse(start, "window.start"), parse(end, "window.end")
                    self._not_future([(f"{what}: window.start", t0), (f"{what}: window.end", t1)], now)
                    start, end = fmt(t0), fmt(t1)
            except RejectedError as exc:
                rejected.append(Rejection(i, exc.reason, str(exc), topic_device or s.device_id, envelope()))
                continue
            if span is not None and signed_bytes is received:  # the body is a slice of the message
                accepted.append(Accepted(i, s.device_id, s.seq, s.model, s.version, start, end, s.predictions, "",
                                         signatures_json(), duplicate, span))
            else:
                accepted.append(Accepted(i, s.device_id, s.seq, s.model, s.version, start, end, s.predictions,
                                         signed_bytes.decode(), signatures_json(), duplicate))
        rejected.sort(key=lambda r: r.index or 0)
        return Checked(accepted, rejected)

    def admit(self, checked: Checked) -> Checked:
        """Take one token per new (not already stored) summary; refuse the rest as ``rate_limited``. Every
        ``rate_limited`` refusal (also those of stage one) takes a token of the device's quarantine allowance,
        or is marked not ``kept`` (dropped and counted) when there is none left."""
        accepted: list[Accepted] = []
        rejected: list[Rejection] = []
        for r in checked.rejected:
            if r.reason == "rate_limited" and r.device_id is not None and not self.limiter.quarantine(r.device_id):
                r = replace(r, kept=False)
            rejected.append(r)
        for a in checked.accepted:
            if a.duplicate or self.limiter.take(a.device_id):
                accepted.append(a)
            else:
                exc = self._over_rate(a.device_id)
                rejected.append(Rejection(a.index, exc.reason, str(exc), a.device_id, a.envelope(),
                                          self.limiter.quarantine(a.device_id)))
        rejected.sort(key=lambda r: r.index or 0)
        return Checked(accepted, rejected)

    def _over_rate(self, device_id: str) -> RejectedError:
        return reject("rate_limited", f"device {device_id} is over {self.settings.device_rate_per_minute} "
                                      "summaries a minute; send fewer, larger windows (or raise "
                                      "device_rate_per_minute)")

    def _check_summary(self, env: Any, i: int, topic_device: str | None, source: str) -> _Staged:
        what = f"summary [{i}]"
        signed, signed_bytes = self._signed_part(env, what)
        try:
            s = Summary.from_dict(signed)
        except ContractError as exc:
            raise reject("schema", f"{what}: {exc}") from None
        self._check_sender(s.device_id, what, topic_device, source)
        head = self._stored_seq(_Head(s.device_id, s.seq, s.model, s.version, s.start, s.end, s.count))
        return _Staged(i, head, signed_bytes, None, lambda w: self._envelope_signatures(env, w),
                       lambda: canonical_bytes(signed), lambda: dump(env), lambda: compact_json(env["signatures"]))

    def _signed_part(self, env: Any, what: str) -> tuple[dict[str, Any], bytes]:
        """The signed part of an envelope (summary or report) and its canonical bytes: what the device signed
        (see ``_verify``), within ``settings.max_summary_bytes``."""
        signed = self._envelope_shape(env, what)
        signed_bytes = canonical_fast(signed)
        if len(signed_bytes) > self.settings.max_summary_bytes:
            raise reject("too_large", f"{what} is {len(signed_bytes)} bytes, over the "
                                      f"{self.settings.max_summary_bytes}-byte limit for a signed document")
        return signed, signed_bytes

    def _check_sender(self, device_id: str, what: str, topic_device: str | None, source: str) -> None:
        """The device is enrolled, and (MQTT) it is the device of the topic the document came on."""
        if self._device_key(device_id) is None:
            raise self._not_enrolled(device_id, what)
        if source == "mqtt" and topic_device != device_id:
            raise reject("topic_mismatch", f"{what} is for device {device_id!r} but came on the topic of "
                                           f"device {topic_device!r}")

    # ---- reports and heartbeats -------------------------------------------------------------------------
    def validate_report(self, payload: bytes, *, topic_device: str | None, source: str) -> ReportUpdate:
        """Check a signed report envelope. Raises RejectedError with the same reasons as summaries."""
        self._new_batch([topic_device] if topic_device else [])
        return self._report(payload, topic_device, source)

    def _report(self, payload: bytes, topic_device: str | None, source: str) -> ReportUpdate:
        env = parse_json(payload, MAX_MESSAGE_BYTES)
        signed, signed_bytes = self._signed_part(env, "report")
        try:
            r = Report.from_dict(signed)
        except ContractError as exc:
            raise reject("schema", f"report: {exc}") from None
        self._check_sender(r.device_id, "report", topic_device, source)
        what = f"report of {r.device_id}"
        self._verify(r.device_id, signed_bytes, self._envelope_signatures(env, what), lambda: canonical_bytes(signed),
                     what)
        at = parse(r.at, "report.at")
        self._not_future([("report.at", at)], self.clock())
        return ReportUpdate(r.device_id, at, json.dumps(r.to_dict(), sort_keys=True, separators=(",", ":")))

    def validate_heartbeat(self, payload: bytes, *, topic_device: str | None) -> str:
        """The enrolled device a heartbeat is from. Raises RejectedError (heartbeats are unsigned)."""
        self._new_batch([topic_device] if topic_device else [])
        return self._heartbeat(payload, topic_device)

    def _heartbeat(self, payload: bytes, topic_device: str | None) -> str:
        doc = parse_json(payload, 4096)
        if not isinstance(doc, dict) or not isinstance(doc.get("device_id"), str):
            raise reject("shape", "heartbeat must be an object with a string device_id")
        try:
            device_id = check_id(doc["device_id"], "heartbeat.device_id")
        except SchemaError as exc:
            raise reject("schema", str(exc)) from None
        if self._device_key(device_id) is None:
            raise self._not_enrolled(device_id, "heartbeat")
        if topic_device is not None and topic_device != device_id:
            raise reject("topic_mismatch", f"heartbeat is for device {device_id!r} but came on the topic of "
                                              f"device {topic_device!r}")
        return device_id

    # ---- messages -----------------------------------------------------------------------------------------
    def check(self, kind: str, payload: bytes, *, topic_device: str | None, source: str,
              over_rate: frozenset[str] = frozenset()) -> Submission:
        """Stage one (any thread or validator process): validate a message of ``kind`` into a Submission for
        the writer, taking no rate tokens (``admit_submission`` does). Never raises: a refused message
        becomes a Submission holding its quarantine row."""
        return self.check_batch([(kind, payload, topic_device, source)], over_rate)[0].resolve(payload)

    def check_batch(self, work: Sequence[Work], over_rate: frozenset[str] = frozenset()) -> list[Submission]:
        """``check`` for several messages at once, in order: the device keys of their MQTT topics are read in
        one query and which summaries are already stored in another. Never raises. Bodies verified as received
        are left as spans of their message: ``Submission.resolve(payload)`` fills them in where the message is
        (the validator processes answer without sending the bodies back)."""
        self._new_batch([td for _, _, td, _ in work if td])
        now = self.clock()
        subs: list[Submission] = []
        pending: list[tuple[Submission, bytes, str | None, list[_Staged], list[Rejection]]] = []
        for kind, payload, topic_device, source in work:
            sub = Submission(kind, source, now)
            subs.append(sub)
            try:
                if kind == "summary":
                    staged, rejected = self._stage(payload, topic_device, source)
                    pending.append((sub, payload, topic_device, staged, rejected))
                elif kind == "report":
                    sub.report = self._report(payload, topic_device, source)
                    sub.seen = (sub.report.device_id,)
                elif kind == "heartbeat":
                    sub.seen = (self._heartbeat(payload, topic_device),)
                else:
                    raise reject("shape", f"unknown message kind {kind!r}; known: {', '.join(KINDS)}")
            except Exception as exc:
                self._refuse(sub, exc, payload, topic_device)
        try:
            stored = self._stored([(x.head.device_id, x.head.seq) for *_, staged, _ in pending for x in staged])
        except Exception as exc:  # e.g. the store is unreadable: as for any failed check, quarantine and say why
            for sub, payload, topic_device, _, _ in pending:
                self._refuse(sub, exc, payload, topic_device)
            return subs
        horizon = _horizon(now)
        for sub, payload, topic_device, staged, rejected in pending:
            try:
                checked = self._settle(staged, rejected, stored, topic_device, over_rate, now, horizon)
                sub.summaries, sub.rejections = checked.accepted, checked.rejected
            except Exception as exc:
                self._refuse(sub, exc, payload, topic_device)
        return subs

    @staticmethod
    def _refuse(sub: Submission, exc: Exception, payload: bytes, topic_device: str | None) -> None:
        """Make ``sub`` the quarantine row of its whole message (a bug becomes reason ``internal``)."""
        sub.summaries, sub.report, sub.seen = [], None, ()
        if isinstance(exc, RejectedError):
            sub.rejections = [Rejection(None, exc.reason, str(exc), topic_device, payload[:QUARANTINE_PAYLOAD_BYTES])]
            return
        log.error("validating a %s message failed unexpectedly", sub.kind, exc_info=exc)
        sub.rejections = [Rejection(None, "internal", f"server error while validating: {exc!r}", topic_device,
                                    payload[:QUARANTINE_PAYLOAD_BYTES])]

    def admit_submission(self, sub: Submission) -> Submission:
        """Stage two (where the rate buckets are): take tokens for the new summaries of ``sub``."""
        if sub.kind == "summary" and (sub.summaries or sub.rejections):
            checked = self.admit(Checked(sub.summaries, sub.rejections))
            sub.summaries, sub.rejections = checked.accepted, checked.rejected
            sub.seen = tuple(sorted({a.device_id for a in checked.accepted}))
        return sub


def _horizon(now: float) -> str:
    """The latest window time accepted at ``now``, normalised (normalised times compare as strings)."""
    return fmt(datetime.fromtimestamp(now, UTC) + FUTURE_SKEW)
