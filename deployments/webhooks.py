"""Webhooks: where they may go, how they are signed, how they are delivered.

A job's ``webhook_url`` receives one POST when the job ends. The body is the job as
``GET /v1/generations/{id}`` shows it; the headers carry::

    X-InstantID-Event:      generation.succeeded | generation.failed | generation.canceled
    X-InstantID-Delivery:   a unique id (the same across retries of one delivery)
    X-InstantID-Signature:  t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

The secret is per API key (``GET /v1/webhooks/secret``). Receivers recompute the HMAC
over the raw body and refuse old timestamps. Targets must match the configured allowlist
and, unless private targets are explicitly allowed (tests), resolve to public addresses
only: no loopback, private, link-local or metadata-service targets.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from urllib.parse import urlsplit

from pipeline.errors import InvalidParameter

SIGNATURE_HEADER = "X-InstantID-Signature"


def key_secret(master: str, owner: str) -> str:
    """The webhook signing secret of one API key (derived: nothing extra to store)."""
    return "whsec_" + hmac.new(master.encode(), f"webhook\n{owner}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, tolerance_s: int = 300, now: float | None = None) -> bool:
    """What a receiver does: check the signature and that it is recent."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowlist:
        pattern = pattern.lower().rstrip(".")
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def check_target(url: str, allowlist: list[str], allow_private: bool, field: str = "webhook_url") -> str:
    """Validate a webhook URL; raise :class:`InvalidParameter` naming the problem."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidParameter(field, "must be an absolute https:// URL")
    if parts.scheme == "http" and not allow_private:
        raise InvalidParameter(field, "must use https")
    if parts.username or parts.password:
        raise InvalidParameter(field, "must not carry credentials")
    if not _host_allowed(parts.hostname, allowlist):
        raise InvalidParameter(field, f"host {parts.hostname!r} is not on this server's webhook allowlist")
    if not allow_private:
        for address in _addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), field):
            if not address.is_global:
                raise InvalidParameter(field, f"host {parts.hostname!r} resolves to a non-public address")
    return url


def _addresses(host: str, port: int, field: str) -> list[ipaddress._BaseAddress]:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise InvalidParameter(field, f"host {host!r} does not resolve") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def deliver(url: str, payload: dict, *, event: str, secret: str, delivery_id: str, attempts: int,
                  backoff_s: float, timeout_s: float = 10.0, check=None) -> dict:
    """POST ``payload`` until a 2xx answer or ``attempts`` tries (exponential backoff).
    ``check(url)`` re-validates the target before each try. Returns what happened."""
    import httpx

    body = json.dumps(payload, separators=(",", ":")).encode()
    outcome = {"url": url, "delivered": False, "attempts": 0, "last_status": None, "last_error": None}
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(attempts):
            outcome["attempts"] = attempt + 1
            try:
                if check is not None:
                    await asyncio.to_thread(check, url)  # it resolves the host: off the event loop
                response = await client.post(url, content=body, headers={
                    "Content-Type": "application/json",
                    "X-InstantID-Event": event,
                    "X-InstantID-Delivery": delivery_id,
                    SIGNATURE_HEADER: sign(secret, body),
                })
                outcome["last_status"] = response.status_code
                if 200 <= response.status_code < 300:
                    outcome["delivered"] = True
                    return outcome
            except InvalidParameter as error:
                outcome["last_error"] = str(error)
                return outcome  # the target became unacceptable: do not retry
            except httpx.HTTPError as error:
                outcome["last_error"] = f"{type(error).__name__}: {error}"
            if attempt + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
    return outcome
