"""API keys: stored only as SHA-256 digests, compared in constant time.

A key's *owner id* (the first 16 hex digits of its digest) tags what the key creates, so
that a key reads and deletes only its own faces and images. Keys are high-entropy random
tokens, so a plain SHA-256 is the right hash (no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable

LOCAL_OWNER = "local"  # the owner of everything when auth is explicitly disabled


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh API key and the digest to put in the configuration."""
    key = "iid_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def owner_of(digest: str) -> str:
    return digest[:16]


class KeyRing:
    """The accepted key digests (from configuration and/or an environment variable)."""

    def __init__(self, digests: Iterable[str] = (), env_var: str | None = None) -> None:
        values = [d.strip().lower() for d in digests if d and d.strip()]
        if env_var and os.environ.get(env_var):
            values += [d.strip().lower() for d in os.environ[env_var].split(",") if d.strip()]
        for value in values:
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError("API keys must be configured as SHA-256 hex digests (see `instantid hash-key`)")
        self._digests = tuple(dict.fromkeys(values))

    def __len__(self) -> int:
        return len(self._digests)

    def owner(self, key: str) -> str | None:
        """The owner id of ``key``, or ``None`` when it is not a known key."""
        digest = hash_key(key)
        found = None
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(known, digest):
                found = known
        return owner_of(found) if found else None


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
