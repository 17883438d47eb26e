import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.webhooks import check_target, deliver, key_secret, sign, verify
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
     ("http://127.0.0.1:9/x", True, None)],
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
                 "localhost", "127.0.0.1", "169.254.169.254", "10.0.0.5"]
    if needle is None:
        assert check_target(url, allowlist, allow_private) == url
    else:
        with pytest.raises(InvalidParameter, match=needle):
            check_target(url, allowlist, allow_private)


class Receiver:
    """A webhook receiver on loopback that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int = 0) -> None:
        self.requests: list[dict] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                status = 500 if len(receiver.requests) <= receiver.failures else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
