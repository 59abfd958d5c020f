"""API keys with roles, hashed at rest.

Keys are 256 random bits, so a plain SHA-256 is the right hash: a slow password hash
(bcrypt, scrypt) protects guessable secrets and would only cost ingest latency here.
`FLYWHEEL_ADMIN_KEY` (settings.admin_key) is accepted as an admin key without being
stored: the bootstrap for scripts and tests.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

from ray_app.errors import ConfigError, Forbidden, Unauthorized

if TYPE_CHECKING:
    from ray_app.storage.base import JobStore

ROLES = ("admin", "ingest", "operator", "auditor")

# What each action needs. Admin may do everything.
PERMISSIONS: dict[str, frozenset[str]] = {
    "logs:write": frozenset({"admin", "ingest"}),
    "logs:read": frozenset({"admin", "operator", "auditor"}),
    "feedback:write": frozenset({"admin", "ingest", "operator"}),
    "validate": frozenset({"admin", "ingest", "operator", "auditor"}),
    "jobs:read": frozenset({"admin", "operator", "auditor"}),
    "jobs:write": frozenset({"admin", "operator"}),
    "audit:read": frozenset({"admin", "auditor"}),
    "metrics:read": frozenset({"admin", "operator", "auditor"}),
    "chat": frozenset({"admin", "ingest"}),  # the gateway: a service's calls, answered and logged
    "models:read": frozenset({"admin", "ingest", "operator", "auditor"}),
    "routes:write": frozenset({"admin", "operator"}),
}

KEY_PREFIX = "fw_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: JobStore, *, role: str, name: str = "") -> str:
    """Store a new key's hash and return the key itself (shown once)."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}", field="role")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    store.put_api_key(hash_key(key), role, name)
    return key


class Authenticator:
    """Resolves `Authorization: Bearer KEY` to a role, with a short cache for the hot path."""

    def __init__(self, store: JobStore, *, admin_key: str | None, cache_seconds: float = 30.0):
        self._store = store
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._cache: dict[str, tuple[str, float]] = {}
        self._ttl = cache_seconds

    def role_for(self, authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        digest = hash_key(authorization[7:].strip())
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return "admin"
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached and cached[1] > now:
            return cached[0]
        found = self._store.get_api_key(digest)
        if found is None:
            raise Unauthorized("unknown API key")
        self._cache[digest] = (found["role"], now + self._ttl)
        return found["role"]

    def require(self, authorization: str | None, action: str) -> str:
        role = self.role_for(authorization)
        if role not in PERMISSIONS[action]:
            raise Forbidden(f"role {role!r} may not {action}", details={"role": role, "action": action})
        return role
