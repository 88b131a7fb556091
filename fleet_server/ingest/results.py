"""What ingest hands between its stages: accepted summaries, rejections, submissions and outcomes, plus the
limits and reason tokens shared by every stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..errors import RejectedError

__all__ = ["Accepted", "Checked", "KINDS", "MAX_ENVELOPES", "MAX_MESSAGE_BYTES", "Outcome", "QUARANTINE_PAYLOAD_BYTES",
           "REASONS", "Rejection", "ReportUpdate", "Submission", "reject"]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one MQTT message or HTTP body
MAX_ENVELOPES = 500  # envelopes per message
QUARANTINE_PAYLOAD_BYTES = 64 * 1024
FUTURE_SKEW = timedelta(minutes=5)
REASONS = ("too_large", "malformed_json", "shape", "schema", "unknown_device", "device_revoked", "topic_mismatch",
           "bad_signature", "unknown_model_version", "future_timestamp", "rate_limited", "internal")
KINDS = ("summary", "report", "heartbeat")

# ---- results --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Accepted:
    """A summary that passed every check, ready to store.

    A validator process answers with ``span`` (where the signed bytes lie in the message) instead of ``body``
    when the signature verified over the bytes as received: the process that holds the message fills ``body``
    (``Submission.resolve``), so the 5 KB body does not travel back through the pipe.
    """

    index: int  # position in its message
    device_id: str
    seq: int
    model: str
    version: str
    start: str  # normalised ...Z
    end: str
    count: int
    body: str  # JSON of the signed summary document: the bytes that were signed (canonical for the agent)
    signatures: str = "[]"  # JSON of the envelope's signatures (to quarantine it whole if rate limited)
    duplicate: bool = False  # already stored when validated (takes no token)
    span: tuple[int, int] | None = None  # body = message[span[0]:span[1]], until resolved

    def envelope(self) -> bytes:
        if self.span is not None:
            raise RuntimeError("Accepted.envelope() before Submission.resolve(): the body is not filled in")
        return f'{{"signed":{self.body},"signatures":{self.signatures}}}'.encode()


@dataclass(frozen=True)
class Rejection:
    """One refused document: an envelope (``index``), or a whole message (``index`` None). Quarantined unless
    ``kept`` is False (a rate-limited summary past its device's quarantine allowance: dropped and counted)."""

    index: int | None
    reason: str
    detail: str
    device_id: str | None  # who sent it, as far as known: the MQTT topic's device, else the device claimed
    payload: bytes  # truncated to QUARANTINE_PAYLOAD_BYTES when stored
    kept: bool = True


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

    def resolve(self, payload: bytes) -> Submission:
        """Fill in the bodies a validator process left as spans of ``payload`` (the message it checked)."""
        for a in self.summaries:
            if a.span is not None:
                a.body = payload[a.span[0]:a.span[1]].decode()
                a.span = None
        return self

    @property
    def rows(self) -> int:
        return len(self.summaries) + len(self.rejections) + (self.report is not None)


def reject(reason: str, detail: str) -> RejectedError:
    return RejectedError(reason, detail)
