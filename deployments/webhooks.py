"""Webhooks: where they may go, how they are signed, how they are delivered.

A job's ``webhook_url`` receives one POST when the job ends. The body is the job as
``GET /v1/generations/{id}`` shows it; the headers carry::

    X-InstantID-Event:      generation.succeeded | generation.failed | generation.canceled
    X-InstantID-Delivery:   the event's id: the same across retries, and when a runner that
                            took the job over delivers it again (delivery is at least once:
                            receivers drop an id they have already processed)
    X-InstantID-Signature:  t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

The secret is per API key (``GET /v1/webhooks/secret``). Receivers recompute the HMAC
over the raw body and refuse old timestamps. Targets must match the configured allowlist
and, unless private targets are explicitly allowed (tests), be https on port 443 (or a port
the allowlist names) and resolve to public addresses only: no loopback, private,
link-local or metadata-service targets, no IPv6 form of an IPv4 address. Delivery connects
to the address that was checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
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


# IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo):
# whatever IPv4 address is inside, a webhook never goes to one of these
IPV4_CARRIERS = tuple(ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48",
                                                       "2002::/16", "2001::/32"))
RESPONSE_CAP = 64 * 1024  # what is read of a receiver's answer, at most


@dataclass(frozen=True)
class Target:
    """A checked webhook target: the URL as given and the address it was checked at,
    which is the one delivery connects to (no second DNS lookup a rebinding could answer)."""

    url: str
    host: str
    port: int
    address: str


def _patterns(allowlist: list[str]) -> list[tuple[str, int | None]]:
    """Allowlist entries: ``host``, ``*.domain``, or either with ``:port``."""
    found = []
    for entry in allowlist:
        entry = entry.lower().strip()
        host, colon, port = entry.rpartition(":")
        if colon and host and port.isdigit() and ":" not in host:
            found.append((host.rstrip("."), int(port)))
        else:
            found.append((entry.rstrip("."), None))
    return found


def _host_matches(host: str, pattern: str) -> bool:
    return host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))


def _acceptable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if address.version == 6 and any(address in network for network in IPV4_CARRIERS):
        return False
    return address.is_global


def resolve_target(url: str, allowlist: list[str], allow_private: bool, field: str = "webhook_url") -> Target:
    """Validate a webhook URL and resolve its host once; raise :class:`InvalidParameter`
    naming the problem. Unless ``allow_private`` (tests only: http, private and loopback
    targets, any port), the URL is https, on port 443 or a port the allowlist names for its
    host, and every address the host resolves to is public."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidParameter(field, "must be an absolute https:// URL")
    if parts.scheme == "http" and not allow_private:
        raise InvalidParameter(field, "must use https")
    if parts.username or parts.password:
        raise InvalidParameter(field, "must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidParameter(field, "has an invalid port") from None
    host = parts.hostname.lower().rstrip(".")
    matching = [named for pattern, named in _patterns(allowlist) if _host_matches(host, pattern)]
    if not matching:
        raise InvalidParameter(field, f"host {host!r} is not on this server's webhook allowlist")
    if not allow_private and port != 443 and port not in matching:
        raise InvalidParameter(field, f"port {port} is not on this server's webhook allowlist for {host!r} "
                                      "(443 is)")
    addresses = _addresses(host, port, field)
    if not allow_private and not all(_acceptable(address) for address in addresses):
        raise InvalidParameter(field, f"host {host!r} resolves to a non-public address")
    return Target(url=url, host=host, port=port, address=str(addresses[0]))


def check_target(url: str, allowlist: list[str], allow_private: bool, field: str = "webhook_url") -> str:
    """:func:`resolve_target`, for a check that needs only the verdict."""
    return resolve_target(url, allowlist, allow_private, field).url


def _addresses(host: str, port: int, field: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise InvalidParameter(field, f"host {host!r} does not resolve") from None
    if not infos:
        raise InvalidParameter(field, f"host {host!r} does not resolve")
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def deliver(url: str, payload: dict, *, event: str, secret: str, delivery_id: str, attempts: int,
                  backoff_s: float, timeout_s: float = 10.0, check=None) -> dict:
    """POST ``payload`` until a 2xx answer or ``attempts`` tries (exponential backoff).
    ``check(url)`` re-validates the target before each try and returns the :class:`Target`
    to connect to. Each try has ``timeout_s`` in all (connect, send, answer); at most
    :data:`RESPONSE_CAP` bytes of the answer are read. Proxy settings from the environment
    are ignored. Returns what happened."""
    import httpx

    body = json.dumps(payload, separators=(",", ":")).encode()
    outcome = {"url": url, "delivered": False, "attempts": 0, "last_status": None, "last_error": None}
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for attempt in range(attempts):
            outcome["attempts"] = attempt + 1
            try:
                target = await asyncio.to_thread(check, url) if check is not None else None  # resolves: off the loop
                request_url, headers, extensions = httpx.URL(url), {}, {}
                if target is not None:  # connect to the checked address, name the host as given
                    headers["Host"] = request_url.netloc.decode("ascii")
                    if request_url.scheme == "https":
                        extensions["sni_hostname"] = target.host
                    request_url = request_url.copy_with(host=target.address)
                headers.update({"Content-Type": "application/json", "X-InstantID-Event": event,
                                "X-InstantID-Delivery": delivery_id, SIGNATURE_HEADER: sign(secret, body)})
                async with asyncio.timeout(timeout_s):
                    async with client.stream("POST", request_url, content=body, headers=headers,
                                             extensions=extensions) as response:
                        read = 0
                        async for chunk in response.aiter_raw():
                            read += len(chunk)
                            if read > RESPONSE_CAP:
                                break
                outcome["last_status"] = response.status_code
                if 200 <= response.status_code < 300:
                    outcome["delivered"] = True
                    return outcome
            except InvalidParameter as error:
                outcome["last_error"] = str(error)
                return outcome  # the target became unacceptable: do not retry
            except (httpx.HTTPError, TimeoutError) as error:
                outcome["last_error"] = f"{type(error).__name__}: {error}"
            if attempt + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
    return outcome
