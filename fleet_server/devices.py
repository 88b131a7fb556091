"""Device enrollment (operator-side or with one-time enrollment tokens), listing, tags, reported state."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.signing import public_b64, public_from_b64
from edgefleet_contracts.tags import check_tag
from edgefleet_contracts.tags import parse_tag as _parse_tag
from edgefleet_contracts.topics import check_id

from .errors import AuthError, ConflictError, NotFoundError, RequestError
from .store import Store, record_event


def check_tags(tags: Any, name: str = "tags", what: str = "tag") -> dict[str, str]:
    """Tags as stored (enroll, set_tags, enrollment tokens) and as a rollout's cohort names them follow the tag
    contract (:mod:`edgefleet_contracts.tags`), so every stored tag can be filtered on with ``tag=key=value``: a
    key with ``=``, a control character or edge whitespace is refused (RequestError naming ``name`` and the bad
    pair, each pair called ``what``) rather than stored unreachable."""
    if not isinstance(tags, Mapping):
        raise RequestError(f'{name} must be an object of tags, like {{"site": "north"}}, not {tags!r}')
    out: dict[str, str] = {}
    for k, v in tags.items():
        try:
            out[k] = check_tag(k, v, what)[1]
        except SchemaError as exc:
            raise RequestError(str(exc)) from None
    return out


def public_key_text(text: str) -> str:
    """A device's Ed25519 public key, given as the device's ``keys/device.pub`` holds it (PEM) or as base64 of
    the 32 raw bytes, in its one base64 spelling (base64 has more than one for the same 32 bytes). Raises
    SchemaError saying which forms are accepted."""
    if "-----BEGIN" not in text:
        try:
            return public_b64(public_from_b64(text.strip()))
        except SchemaError as exc:
            raise SchemaError(f"{exc}; send the device's keys/device.pub (PEM) or base64 of its 32 raw bytes") from None
    try:
        key = serialization.load_pem_public_key(text.strip().encode())
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise SchemaError(f"public key is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SchemaError(f"public key is a {type(key).__name__}, not an Ed25519 public key")
    return public_b64(key)


def enroll(store: Store, fleet: str, device_id: str, public_key_b64: str, tags: dict[str, str] | None = None,
           *, replace: bool = False) -> dict[str, Any]:
    """Enroll a device by its Ed25519 public key (PEM, or base64 raw: :func:`public_key_text`). Raises
    RequestError or ConflictError."""
    key, tags = _checked(device_id, public_key_b64, tags)
    with store.write() as c:
        _enroll_in(c, fleet, device_id, key, tags, replace=replace)
    return get(store, device_id)


def _checked(device_id: str, public_key_b64: str, tags: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """The key in its one base64 spelling (base64 has more than one for the same 32 bytes) and the tags, once
    the id, key and tags are valid. Raises RequestError."""
    try:
        check_id(device_id, "device id")
        key = public_key_text(public_key_b64)
    except SchemaError as exc:
        raise RequestError(str(exc)) from None
    return key, check_tags(tags or {})


def _enroll_in(c: Any, fleet: str, device_id: str, public_key_b64: str, tags: dict[str, str], *,
               replace: bool) -> None:
    """Inside a write transaction, so the check and the write are one step (two concurrent enrollments of one
    device id with different keys: the second is refused, not silently replacing the first).

    A revoked device comes back only through an operator's ``replace`` with a key other than the revoked one
    (a new key made on the recovered or replacement device); that enrollment lifts the revocation.

    A new key starts a new generation of the device: a new key comes with a newly provisioned device folder,
    whose summaries count from seq 1 again. So its ``seq_base`` becomes the highest seq stored for the device,
    and its summaries are stored at ``seq + seq_base`` (ingest adds it): without that, they would be taken for
    replays of the previous generation's and dropped. ``public_key_b64`` is in its one spelling (``_checked``);
    a stored key is compared in that spelling too (rows enrolled before keys were stored so may not be)."""
    existing = c.execute("SELECT public_key, revoked, seq_base FROM devices WHERE device_id = ?",
                         (device_id,)).fetchone()
    same_key = existing is not None and _checked(device_id, existing["public_key"], None)[0] == public_key_b64
    if existing is not None and existing["revoked"] is not None:
        if not replace:
            raise ConflictError(f"device {device_id} was revoked; an operator may enroll it again with a new key "
                                "(`fleet-server devices enroll --replace`)")
        if same_key:
            raise ConflictError(f"device {device_id} was revoked with this key; enroll it with a new key")
        record_event(c, time.time(), "device", device_id, {"action": "reinstated", "by": "enroll --replace"})
    elif existing is not None and not same_key and not replace:
        raise ConflictError(f"device {device_id} is already enrolled with another key; re-enroll with --replace")
    base = int(existing["seq_base"]) if existing is not None else 0
    if existing is not None and not same_key:
        row = c.execute("SELECT MAX(seq) FROM summaries WHERE device_id = ?", (device_id,)).fetchone()
        base = max(base, int(row[0] or 0))
    c.execute(
        "INSERT INTO devices (device_id, public_key, fleet, tags, enrolled, seq_base) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(device_id) DO UPDATE SET public_key=excluded.public_key, tags=excluded.tags,"
        " revoked=NULL, revoked_reason=NULL, seq_base=excluded.seq_base",
        (device_id, public_key_b64, fleet, json.dumps(tags, sort_keys=True), time.time(), base))


def revoke(store: Store, device_id: str, reason: str, by: str) -> dict[str, Any]:
    """Revoke a lost, stolen or retired device: from the next ingest batch on its summaries, reports and
    heartbeats are refused (``device_revoked``, quarantined and counted, so a stolen device that keeps sending
    is visible), rollouts no longer target it and its retained desired state is cleared on the broker. What it
    sent before stays (the fleet's history). Revoking a revoked device changes nothing. Raises NotFoundError,
    RequestError (a reason is required: it is the record of why)."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise RequestError("a revocation needs a reason (1 to 500 characters), e.g. \"stolen from ward 3\"")
    with store.write() as c:
        row = c.execute("SELECT revoked FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"device {device_id!r} is not enrolled")
        if row["revoked"] is None:
            now, why = time.time(), reason.strip()
            c.execute("UPDATE devices SET revoked = ?, revoked_reason = ? WHERE device_id = ?", (now, why, device_id))
            # Its retained desired state is cleared on the broker (an empty retained message, published with the
            # other pending desired states), so a stolen device that reconnects is not handed it again.
            c.execute("UPDATE desired SET envelope = '', seq = seq + 1, published = 0, updated = ? WHERE device_id = ?",
                      (now, device_id))
            record_event(c, now, "device", device_id, {"action": "revoked", "reason": why, "by": by})
    return get(store, device_id)


def create_enrollment_token(store: Store, tags: dict[str, str] | None = None, ttl_seconds: float = 86400) -> str:
    token = "efe_" + secrets.token_urlsafe(24)
    with store.write() as c:
        c.execute("INSERT INTO enrollment_tokens VALUES (?, ?, ?, ?, NULL)",
                  (hashlib.sha256(token.encode()).hexdigest(), json.dumps(check_tags(tags or {})), time.time(),
                   time.time() + ttl_seconds))
    return token


def self_enroll(store: Store, fleet: str, token: str, device_id: str, public_key_b64: str) -> dict[str, Any]:
    """A device enrolls itself with a one-time token. Raises AuthError when the token is unknown/used/expired
    (RequestError, ConflictError as ``enroll``).

    The token is taken and the device enrolled in one write transaction: of two requests racing with one
    token, exactly one enrolls; a refused enrollment (a device id enrolled with another key) leaves the token
    unused."""
    h = hashlib.sha256(token.encode()).hexdigest()
    key, _ = _checked(device_id, public_key_b64, None)
    with store.write() as c:
        row = c.execute("SELECT tags, expires, used_by FROM enrollment_tokens WHERE hash = ?", (h,)).fetchone()
        if row is None:
            raise AuthError("unknown enrollment token")
        if row["used_by"] is not None:
            raise AuthError(f"enrollment token already used by {row['used_by']}")
        if row["expires"] < time.time():
            raise AuthError("enrollment token expired")
        c.execute("UPDATE enrollment_tokens SET used_by = ? WHERE hash = ? AND used_by IS NULL", (device_id, h))
        _enroll_in(c, fleet, device_id, key, json.loads(row["tags"]), replace=False)
    return get(store, device_id)


def _doc(r: Any) -> dict[str, Any]:
    return {"device_id": r["device_id"], "fleet": r["fleet"], "tags": json.loads(r["tags"]),
            "public_key": r["public_key"], "enrolled": r["enrolled"], "last_seen": r["last_seen"],
            "reported": json.loads(r["reported"]) if r["reported"] else None,
            "state": "revoked" if r["revoked"] is not None else "active", "revoked": r["revoked"],
            "revoked_reason": r["revoked_reason"]}


def get(store: Store, device_id: str) -> dict[str, Any]:
    r = store.one("SELECT * FROM devices WHERE device_id = ?", (device_id,))
    if r is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    return _doc(r)


def parse_tag(text: str) -> tuple[str, str]:
    """A ``key=value`` tag filter as (key, value), by the tag contract (:mod:`edgefleet_contracts.tags`): split
    at the first ``=`` (the value may hold ``=``), the value may be empty (``site=`` asks for the devices whose
    site is ``""``), a key or value with a control character or edge whitespace is refused, not stripped.
    Raises RequestError (422) naming the filter and what is wrong with it."""
    try:
        return _parse_tag(text, "tag filter")
    except SchemaError as exc:
        raise RequestError(f"{exc}; e.g. tag=site=north") from None


def list_devices(store: Store, tag: tuple[str, str] | None = None, *, limit: int | None = None,
                 after: str | None = None) -> list[dict[str, Any]]:
    """Devices in device id order: those whose tag ``tag[0]`` is ``tag[1]`` when given, past the device id
    ``after`` (exclusive), at most ``limit`` of them (all when None). The tag and the cursor are matched in SQL."""
    where: list[str] = []
    args: list[Any] = []
    if after is not None:
        where.append("device_id > ?")
        args.append(after)
    if tag is not None:
        # json_each rather than json_extract: a JSON path cannot quote a key holding '"' (SQLite has no escape in
        # path labels) and would read '.' or '[' in a key as path syntax; here key and value are plain bound text.
        where.append("EXISTS (SELECT 1 FROM json_each(devices.tags) WHERE key = ? AND type = 'text' AND value = ?)")
        args.extend(tag)
    sql = "SELECT * FROM devices" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY device_id"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return [_doc(r) for r in store.query(sql, tuple(args))]


def set_tags(store: Store, device_id: str, tags: dict[str, str]) -> dict[str, Any]:
    get(store, device_id)
    with store.write() as c:
        c.execute("UPDATE devices SET tags = ? WHERE device_id = ?", (json.dumps(check_tags(tags)), device_id))
    return get(store, device_id)
