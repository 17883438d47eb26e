"""Who is calling, and whether they may now: API keys (``Authorization: Bearer``, checked
against SHA-256 digests; the routes depend on :func:`caller`) and the per-key limits of the
one RateLimiter deployment (:meth:`Gate.charge`, once a request is known to be valid)."""

import time

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import RateLimited, Unauthorized

from .auth import LOCAL_OWNER, KeyRing
from .calls import call
from service.config import AppArgs

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


class Gate:
    def __init__(self, args: AppArgs, limiter) -> None:
        self.disabled = args.auth.disabled
        self.keys = KeyRing(args.auth.api_key_sha256, args.auth.api_keys_env)
        if not self.disabled and len(self.keys) == 0:
            raise ValueError(f"auth is on but no API key digest is configured (nor in ${args.auth.api_keys_env})")
        self.limiter = limiter  # None: no per-key limits configured

    def owner(self, credentials: HTTPAuthorizationCredentials | None) -> str:
        if self.disabled:
            return LOCAL_OWNER
        owner = self.keys.owner(credentials.credentials) if credentials is not None else None
        if owner is None:
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        return owner

    async def charge(self, owner: str, images: int = 0) -> None:
        """One request (and ``images`` images of the daily quota) for this key, or
        :class:`RateLimited` with the seconds to wait."""
        if self.limiter is None:  # no limits configured (and no RateLimiter deployed)
            return
        verdict = await call(self.limiter.check.remote(owner, images), time.monotonic() + 10, "the rate limiter")
        if not verdict["allowed"]:
            message = ("too many requests for this API key; slow down" if verdict["reason"] == "rate_limited"
                       else f"this API key's daily image quota is used up ({verdict.get('remaining', 0)} left)")
            raise RateLimited(verdict["reason"], message, int(verdict["retry_after"]))


async def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """The owner id of the calling API key (401 without a valid one)."""
    return request.app.state.gate.owner(credentials)
