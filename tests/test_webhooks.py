import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.webhooks import RESPONSE_CAP, check_target, deliver, key_secret, resolve_target, sign, verify
from pipeline.errors import InvalidParameter


def test_signatures_verify_and_refuse_tampering_and_old_timestamps():
    secret = key_secret("master", "owner-a")
    assert secret != key_secret("master", "owner-b") and secret != key_secret("other", "owner-a")
    body = b'{"id":"g_1","status":"succeeded"}'
    header = sign(secret, body)
    assert verify(secret, body, header)
    assert not verify(secret, body + b" ", header)
    assert not verify(key_secret("master", "owner-b"), body, header)
    assert not verify(secret, body, sign(secret, body, timestamp=int(time.time()) - 3600))
    assert not verify(secret, body, "garbage")


@pytest.mark.parametrize(
    "url,allow_private,needle",
    [("https://hooks.example.com/x", False, None),
     ("https://a.hooks.example.com/x", False, None),
     ("http://hooks.example.com/x", False, "https"),
     ("https://evil.example.org/x", False, "allowlist"),
     ("https://user:pw@hooks.example.com/x", False, "credentials"),
     ("ftp://hooks.example.com/x", False, "https"),
     ("https://localhost/x", False, "non-public"),
     ("https://127.0.0.1/x", False, "non-public"),
     ("https://169.254.169.254/latest/meta-data", False, "non-public"),
     ("https://10.0.0.5/x", False, "non-public"),
     ("http://127.0.0.1:9/x", True, None),
     # IPv6 forms of an IPv4 address: mapped, compatible, NAT64 (both prefixes), 6to4, Teredo
     ("https://[::ffff:7f00:1]/x", False, "non-public"),
     ("https://[::ffff:5db8:d70e]/x", False, "non-public"),  # even a public IPv4 address inside
     ("https://[::5db8:d70e]/x", False, "non-public"),
     ("https://[64:ff9b::a9fe:a9fe]/x", False, "non-public"),
     ("https://[64:ff9b:1::5db8:d70e]/x", False, "non-public"),
     ("https://[2002:5db8:d70e::1]/x", False, "non-public"),
     ("https://[2001:0:5db8:d70e::1]/x", False, "non-public"),
     ("https://[2606:4700::1111]/x", False, None),  # a public IPv6 address, allowlisted
     # port 443 unless the allowlist names another for the host
     ("https://hooks.example.com:8443/x", False, "port 8443"),
     ("https://ports.example.com:8443/x", False, None),
     ("https://ports.example.com:9443/x", False, "port 9443"),
     ("https://hooks.example.com:99999/x", False, "invalid port")],
)
def test_targets_must_be_allowlisted_and_public(url, allow_private, needle, monkeypatch):
    import socket

    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):  # the example hosts resolve to a public address
        if host.endswith("example.com"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    allowlist = ["*.hooks.example.com", "hooks.example.com", "evil.example.org".replace("evil", "good"),
                 "localhost", "127.0.0.1", "169.254.169.254", "10.0.0.5", "ports.example.com:8443", "::ffff:7f00:1",
                 "::ffff:5db8:d70e", "::5db8:d70e", "64:ff9b::a9fe:a9fe", "64:ff9b:1::5db8:d70e", "2002:5db8:d70e::1",
                 "2001:0:5db8:d70e::1", "2606:4700::1111"]
    if needle is None:
        assert check_target(url, allowlist, allow_private) == url
    else:
        with pytest.raises(InvalidParameter, match=needle):
            check_target(url, allowlist, allow_private)


class Receiver:
    """A webhook receiver on loopback that fails its first ``failures`` deliveries; with
    ``hold``, it answers nothing until :meth:`release`."""

    def __init__(self, failures: int = 0, hold: bool = False) -> None:
        self.requests: list[dict] = []
        self.failures = failures
        self.released = threading.Event()
        if not hold:
            self.released.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.released.wait(timeout=600)
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                status = 500 if len(receiver.requests) <= receiver.failures else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self):
        self.released.set()

    def close(self):
        self.server.shutdown()


def test_delivery_retries_with_backoff_until_accepted():
    receiver = Receiver(failures=2)
    try:
        outcome = asyncio.run(deliver(receiver.url, {"id": "g_1"}, event="generation.succeeded", secret="s",
                                      delivery_id="d1", attempts=5, backoff_s=0.05))
    finally:
        receiver.close()
    assert outcome["delivered"] and outcome["attempts"] == 3 and outcome["last_status"] == 200
    assert len(receiver.requests) == 3
    assert {r["headers"]["X-InstantID-Delivery"] for r in receiver.requests} == {"d1"}
    last = receiver.requests[-1]
    assert verify("s", last["body"], last["headers"]["X-InstantID-Signature"])
    assert json.loads(last["body"]) == {"id": "g_1"}


def test_delivery_gives_up_after_its_attempts():
    receiver = Receiver(failures=10)
    try:
        outcome = asyncio.run(deliver(receiver.url, {}, event="generation.failed", secret="s", delivery_id="d2",
                                      attempts=2, backoff_s=0.01))
    finally:
        receiver.close()
    assert not outcome["delivered"] and outcome["attempts"] == 2 and outcome["last_status"] == 500


def test_delivery_connects_to_the_checked_address_not_to_a_second_lookup(monkeypatch):
    """DNS rebinding: the host resolves to the receiver when it is checked, and elsewhere
    (an unroutable documentation address) on any later lookup; delivery must not look it
    up again. The receiver sees the host's name in the Host header."""
    import socket

    receiver = Receiver()
    port = receiver.server.server_port
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, port_, *args, **kwargs):
        if host == "hooks.test":
            lookups.append(host)
            address = "127.0.0.1" if len(lookups) == 1 else "192.0.2.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]
        return real(host, port_, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://hooks.test:{port}/hook"
    try:
        outcome = asyncio.run(deliver(url, {"id": "g_1"}, event="generation.succeeded", secret="s",
                                      delivery_id="d3", attempts=1, backoff_s=0.01, timeout_s=20,
                                      check=lambda u: resolve_target(u, ["hooks.test"], allow_private=True)))
    finally:
        receiver.close()
    assert outcome["delivered"], outcome
    assert lookups == ["hooks.test"]  # the check's lookup only
    assert receiver.requests[0]["headers"]["Host"] == f"hooks.test:{port}"


def test_delivery_reads_a_capped_answer_and_ignores_proxy_settings(monkeypatch):
    """A receiver that answers with an endless body is read only up to the cap; a proxy
    named in the environment (one that does not exist) is not used."""
    sent = []

    class Endless(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):  # 640 MB if it were all read
                    self.wfile.write(b"x" * 65536)
                    sent.append(65536)
            except OSError:
                pass  # the client stopped reading and closed

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    try:
        outcome = asyncio.run(deliver(f"http://127.0.0.1:{server.server_port}/hook", {}, event="generation.failed",
                                      secret="s", delivery_id="d4", attempts=1, backoff_s=0.01, timeout_s=60))
    finally:
        server.shutdown()
    assert outcome["delivered"] and outcome["last_status"] == 200
    assert sum(sent) < 10_000 * 65536  # the rest was never read
    assert RESPONSE_CAP < 1024 * 1024
