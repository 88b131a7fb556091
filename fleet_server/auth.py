"""Operator bearer tokens with roles (viewer < operator < admin). Only a token's sha256 is stored.

Tokens are made, listed and revoked from the command line only (``fleet-server tokens create|list|revoke``):
whoever holds the data folder administers access, and no API token can mint or revoke another. Each token has
a short public id (shown by ``create`` and ``list``) by which it is revoked; the secret itself also works, for
the case where only a leaked value is known. A revocation applies to the next request (every request looks the
token up), and creations and revocations are recorded as ``token`` events (``fleet-server alerts events --kind
token``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import unicodedata
from typing import Any

from .errors import AuthError, ForbiddenError, NotFoundError, RequestError
from .store import Store, record_event

ROLES = ("viewer", "operator", "admin")
_RANK = {r: i for i, r in enumerate(ROLES)}


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


MAX_NAME_CHARS = 64  # a token's name, as `tokens list` prints it on one line


def token_name_rule_broken(name: str) -> str | None:
    """What is wrong with ``name`` as a token's name, worded to follow "must", or None when it is allowed: at most
    MAX_NAME_CHARS characters, none of them a control, format or line/paragraph separator character (a newline
    in a name would print as a forged line of `tokens list`, a right-to-left mark reorder it)."""
    if len(name) > MAX_NAME_CHARS:
        return f"be at most {MAX_NAME_CHARS} characters, not {len(name)}"
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")]
    if bad:
        return f"hold no control characters (it holds {bad[0]!r})"
    return None


def create_token(store: Store, role: str, name: str = "", ttl_seconds: float | None = None) -> str:
    """Create a token and return it (shown once). Raises RequestError for an unknown role or a name
    :func:`token_name_rule_broken` refuses."""
    if role not in ROLES:
        raise RequestError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    broken = token_name_rule_broken(name)
    if broken is not None:
        raise RequestError(f"a token's name must {broken}")
    if ttl_seconds is not None and not ttl_seconds >= 1:  # 0 must not read as "no expiry"
        raise RequestError(f"a token's lifetime must be at least 1 s, not {ttl_seconds!r} (omit it for no expiry)")
    token = "eft_" + secrets.token_urlsafe(32)
    now = time.time()
    expires = now + ttl_seconds if ttl_seconds is not None else None
    token_id = secrets.token_hex(6)
    with store.write() as c:
        c.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, 0)",
                  (token_id, name or role, role, _hash(token), now, expires))
        record_event(c, now, "token", token_id,
                     {"action": "created", "name": name or role, "role": role, "expires": expires})
    return token


def _doc(row: Any, now: float) -> dict[str, Any]:
    state = ("revoked" if row["revoked"] else
             "expired" if row["expires"] is not None and row["expires"] < now else "active")
    return {"id": row["id"], "name": row["name"], "role": row["role"], "created": row["created"],
            "expires": row["expires"], "state": state}


def token_id(store: Store, token: str) -> str | None:
    """The public id of a token given its secret value (None when unknown)."""
    row = store.one("SELECT id FROM tokens WHERE hash = ?", (_hash(token.strip()),))
    return None if row is None else str(row["id"])


def list_tokens(store: Store) -> list[dict[str, Any]]:
    """Every token (never its secret: only the hash is stored), oldest first, with its state."""
    now = time.time()
    return [_doc(r, now) for r in store.query("SELECT * FROM tokens ORDER BY created, id")]


def revoke_token(store: Store, which: str, by: str = "cli") -> dict[str, Any]:
    """Revoke a token by its id or by its secret value (``eft_…``); revoking a revoked token changes nothing.
    Returns the token's listing. Raises NotFoundError when no token matches."""
    which = which.strip()
    column, value = ("hash", _hash(which)) if which.startswith("eft_") else ("id", which)
    now = time.time()
    with store.write() as c:
        # ``column`` is one of two fixed names, never input
        row = c.execute(f"SELECT * FROM tokens WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            shown = "that token value" if column == "hash" else f"id {which!r}"
            raise NotFoundError(f"no token with {shown}; `fleet-server tokens list` shows the ids")
        if not row["revoked"]:
            c.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (row["id"],))
            record_event(c, now, "token", row["id"],
                         {"action": "revoked", "name": row["name"], "role": row["role"], "by": by})
        row = c.execute("SELECT * FROM tokens WHERE id = ?", (row["id"],)).fetchone()
    return _doc(row, now)


def authenticate(store: Store, header: str | None) -> tuple[str, str]:
    """(token name, role) for an ``Authorization: Bearer …`` header. Raises AuthError saying what is wrong."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():  # the scheme is case-insensitive (RFC 9110 11.1)
        raise AuthError("missing bearer token (Authorization: Bearer <token>; create one with "
                        "`fleet-server tokens create --role viewer`)")
    row = store.one("SELECT name, role, expires, revoked FROM tokens WHERE hash = ?", (_hash(value.strip()),))
    if row is None:
        raise AuthError("unknown token")
    if row["revoked"]:
        raise AuthError("token revoked")
    if row["expires"] is not None and row["expires"] < time.time():
        raise AuthError("token expired")
    return str(row["name"]), str(row["role"])


def require(role: str, needed: str) -> None:
    if _RANK[role] < _RANK[needed]:
        raise ForbiddenError(f"role {role!r} may not do this; it needs {needed!r}")
