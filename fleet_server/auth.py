"""Operator bearer tokens with roles (viewer < operator < admin). Only a token's sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import time

from .errors import AuthError, ForbiddenError, RequestError
from .store import Store

ROLES = ("viewer", "operator", "admin")
_RANK = {r: i for i, r in enumerate(ROLES)}


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, role: str, name: str = "", ttl_seconds: float | None = None) -> str:
    """Create a token and return it (shown once). Raises RequestError for an unknown role."""
    if role not in ROLES:
        raise RequestError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    token = "eft_" + secrets.token_urlsafe(32)
    now = time.time()
    expires = now + ttl_seconds if ttl_seconds else None
    with store.write() as c:
        c.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, 0)",
                  (secrets.token_hex(6), name or role, role, _hash(token), now, expires))
    return token


def authenticate(store: Store, header: str | None) -> tuple[str, str]:
    """(token name, role) for an ``Authorization: Bearer …`` header. Raises AuthError saying what is wrong."""
    if not header or not header.startswith("Bearer "):
        raise AuthError("missing bearer token (Authorization: Bearer <token>; create one with "
                        "`fleet-server tokens create --role viewer`)")
    row = store.one("SELECT name, role, expires, revoked FROM tokens WHERE hash = ?", (_hash(header[7:].strip()),))
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
