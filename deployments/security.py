"""Who is calling, and whether they may now, decided before anything else about a request.

:class:`AuthFirst` is the API's outermost check: from the request's headers alone it finds
the calling API key (``Authorization: Bearer``, checked against SHA-256 digests) and charges
one request to the key's rate limit (the one RateLimiter deployment keeps the limits for
every ingress replica). A request without a valid key, or over its key's rate, is answered
before a byte of its body is read, parsed or validated. The routes get the caller from
:func:`caller`; a generation's images are charged to the key's daily quota by
:meth:`Gate.charge_images` once the request is known to be valid."""

import time
import weakref

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from pipeline.errors import InstantIDError
from service.config import AppArgs
from service.errors import InvalidHost, RateLimited, Unauthorized

from .auth import LOCAL_OWNER, KeyRing, bearer_token
from .calls import call
from .problems import problem

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
# under /v1/ but open to anyone: signed, expiring links to stored files (the signature is the
# credential) and what the server offers (the web page reads it before it knows a key)
PUBLIC = ("/v1/files/", "/v1/options")


class Gate:
    def __init__(self, args: AppArgs, limiter) -> None:
        self.disabled = args.auth.disabled
        self.keys = KeyRing(args.auth.api_key_sha256, args.auth.api_keys_env)
        if not self.disabled and len(self.keys) == 0:
            raise ValueError(f"auth is on but no API key digest is configured (nor in ${args.auth.api_keys_env})")
        self.limiter = limiter  # None: no per-key limits configured (and no RateLimiter deployed)
        self.rates = args.rate_limits

    def owner(self, authorization: str | None) -> str:
        """The owner id of the key in an ``Authorization`` header, or :class:`Unauthorized`."""
        if self.disabled:
            return LOCAL_OWNER
        token = bearer_token(authorization)
        owner = self.keys.owner(token) if token is not None else None
        if owner is None:
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        return owner

    async def admit(self, owner: str) -> None:
        """One request against this key's rate, or :class:`RateLimited` with the seconds to wait."""
        if self.limiter is not None and self.rates.requests_per_minute is not None:
            await self._check(owner, 0, request=True)

    async def charge_images(self, owner: str, images: int) -> None:
        """``images`` images of this key's daily quota, or :class:`RateLimited` (quota_exceeded)."""
        if self.limiter is not None and self.rates.images_per_day is not None and images:
            await self._check(owner, images, request=False)

    async def _check(self, owner: str, images: int, *, request: bool) -> None:
        verdict = await call(self.limiter.check.remote(owner, images, request), time.monotonic() + 10,
                             "the rate limiter")
        if not verdict["allowed"]:
            message = ("too many requests for this API key; slow down" if verdict["reason"] == "rate_limited"
                       else f"this API key's daily image quota is used up ({verdict.get('remaining', 0)} left)")
            raise RateLimited(verdict["reason"], message, int(verdict["retry_after"]))


def route_path(scope) -> str:
    """The path the app routes on (Serve mounts an app under its route prefix, the ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class AuthFirst:
    """ASGI middleware: every API call (``/v1/...`` except :data:`PUBLIC`) is authenticated
    and charged one request from its headers alone; the owner id goes on to the routes in
    the request's state. Refusals are the API's JSON errors (401, 429, 503)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if not path.startswith("/v1/") or path.startswith(PUBLIC[0]) or path == PUBLIC[1]:
            return await self.app(scope, receive, send)
        gate: Gate = scope["app"].state.gate
        try:
            owner = gate.owner(Headers(scope=scope).get("authorization"))
            await gate.admit(owner)
        except InstantIDError as error:
            return await problem(error)(scope, receive, send)
        scope = {**scope, "state": {**scope.get("state", {}), "owner": owner}}
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware, outermost: a request naming a host the app does not answer to
    (``args.allowed_hosts``, when set) is refused, 400 ``invalid_host``. A page on another
    site that rebinds its name to this server's address cannot drive it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            allowed = scope["app"].state.allowed_hosts
            host = host_name(Headers(scope=scope).get("host", ""))
            if allowed and host not in allowed:
                error = InvalidHost(f"this server does not answer to the host {host[:100]!r}")
                return await problem(error)(scope, receive, send)
        await self.app(scope, receive, send)


async def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """The owner id of the calling API key, as :class:`AuthFirst` found it (the ``bearer``
    dependency puts the scheme in the OpenAPI schema)."""
    owner = getattr(request.state, "owner", None)
    if owner is None:  # a route outside AuthFirst's paths: authenticate here (no rate charged)
        owner = request.app.state.gate.owner(request.headers.get("authorization"))
    return owner


class StreamTicket:
    """Held by an open event stream for as long as it lives; the stream gives it back with
    :meth:`close` when it ends (normally, by error or by the client going away)."""

    def __init__(self, owner: str, live: weakref.WeakSet) -> None:
        self.owner, self._live = owner, live

    def close(self) -> None:
        self._live.discard(self)


class EventStreams:
    """The event streams each API key holds open on this replica, at most ``per_key``.
    Each stream holds a :class:`StreamTicket` and closes it when it ends. A ticket is also
    counted by weak reference only, so a stream dropped before its body started (whose
    ``finally`` never runs) gives its place up when it is freed."""

    def __init__(self, per_key: int, retry_after_s: int) -> None:
        self.per_key, self.retry_after_s = per_key, retry_after_s
        self._open: dict[str, weakref.WeakSet] = {}

    def open(self, owner: str) -> StreamTicket:
        live = self._open.setdefault(owner, weakref.WeakSet())
        if len(live) >= self.per_key:
            raise RateLimited("rate_limited", f"this API key already has {self.per_key} event streams open; close "
                                              "one", self.retry_after_s)
        ticket = StreamTicket(owner, live)
        live.add(ticket)
        return ticket
