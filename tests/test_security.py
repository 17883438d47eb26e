"""The second security pass, over real HTTP on the session's apps: a request is judged by
its key before its body is read; bodies cannot make the ingress build millions of objects;
downloads are not cached or sniffed; health and errors reveal no internals; ids are matched
whole; only the image formats the API names are decoded."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tests.conftest import CONSENT, KEY_A, data_url, face_photo
from tests.test_hardening import replica_rss
from tests.test_jobs import started
from tests.test_webhooks import Receiver

INSTANTID = str(Path(sys.executable).parent / "instantid")
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def url(local_app):
    return local_app["url"]


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY_A}"}) as c:
        yield c


def raw_post_head(url: str, path: str, length: int, first_bytes: bytes, key: str | None = None) -> bytes:
    """Send a request's headers and only ``first_bytes`` of its declared ``length``-byte body,
    then wait (up to two minutes) for an answer: only a server that answers from the headers
    alone answers at all."""
    parts = urlsplit(url)
    head = [f"POST {parts.path}{path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}",
            "Content-Type: application/json", f"Content-Length: {length}"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + first_bytes)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_a_request_without_a_key_is_401_before_its_body_is_read(url):
    answer = raw_post_head(url, "/v1/generations", 40 * 1024 * 1024, b'{"face_images": [')
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    answer = raw_post_head(url, "/v1/generations", 40 * 1024 * 1024, b'{"face_images": [', key="iid_not-a-key")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]


def test_a_40_mib_body_without_a_key_costs_the_ingress_no_memory(url):
    """16 million-ish empty lists: parsed, they would take gigabytes of the replica's memory."""
    body = b'{"face_images": [' + b"[]," * (40 * 1024 * 1024 // 3 - 10) + b"[]]}"
    before = replica_rss("Ingress", app="local")
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/generations", content=body, headers={"Content-Type": "application/json"},
                          timeout=300)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert replica_rss("Ingress", app="local") - before < 10 * 1024 * 1024
    print(f"keyless 40 MiB body answered in {time.monotonic() - started:.2f} s")


def test_a_request_waiting_for_its_render_holds_no_copy_of_its_raw_body(client, url):
    """A generation waits behind a long job; its body was 40 MiB (JSON padded with spaces,
    sent in 1 MiB pieces as a slow client would). Once parsed, the ingress keeps the parsed
    request only: while the request still waits, its memory is less than the body's 40 MiB
    above where it was, so no copy of the body is kept (it stayed 77 MiB up when the raw body
    was kept for the request's life; 0-12 MiB up now, alone and beside a busy core).
    The same request is sent once before, not waiting: the replica's allocator keeps the
    pieces' memory for reuse, which is not a body held. Ray Serve's replica keeps the last
    batch of messages it fetched from the proxy until the request ends; the body's last byte
    comes alone, 10 s after the rest, so that batch is small here even when the replica
    lags (with 3 s a full run once measured 31 MiB held for a minute: pieces fetched with the
    last byte, or the allocator keeping them, was not told apart)."""
    import threading

    import psutil

    from tests.test_hardening import replica_pids

    mib = 1024 * 1024
    ingress = [psutil.Process(pid) for pid in replica_pids("Ingress", app="local")]

    def private_memory() -> int:  # the replica's own pages: not the shared object store's
        return sum(process.memory_full_info().uss for process in ingress)

    text = json.dumps({"face_images": [data_url(face_photo())], **SMALL})
    body = (text[:-1] + " " * (40 * mib) + "}").encode()
    sent = threading.Event()

    def pieces(pause_s: float):  # Ray Serve keeps the last batch of body pieces it fetched: make that the closing brace
        for at in range(0, len(body) - 1, mib):
            yield body[at:min(at + mib, len(body) - 1)]
            time.sleep(0.05)
        time.sleep(pause_s)  # the replica fetches every piece before the last byte comes
        yield body[-1:]
        sent.set()

    def post(pause_s: float = 10.0) -> httpx.Response:
        return httpx.post(f"{url}/v1/generations", content=pieces(pause_s), timeout=900, headers={
            "Content-Type": "application/json", "Content-Length": str(len(body)), "Authorization": f"Bearer {KEY_A}"})

    warm_up = post(pause_s=1.0)
    assert warm_up.status_code == 200, warm_up.text
    sent.clear()
    ahead = client.post("/v1/generations", json={"face_images": [data_url(face_photo())], "async": True, "seed": 3,
                                                 "width": 512, "height": 512, "num_inference_steps": 150}).json()
    before, answer = private_memory(), {}
    waiting = threading.Thread(target=lambda: answer.update(response=post()))
    waiting.start()
    try:
        assert sent.wait(300)
        deadline, held = time.monotonic() + 60, None
        while waiting.is_alive() and time.monotonic() < deadline:
            held = private_memory() - before
            if held < 40 * mib:
                break
            time.sleep(0.25)
        assert waiting.is_alive(), "the request ended before its memory was measured"
        assert held is not None and held < 40 * mib, f"{held / mib:.0f} MiB held while the request waits"
    finally:
        client.delete(f"/v1/generations/{ahead['id']}")
        waiting.join(900)
    assert answer["response"].status_code == 200, answer["response"].text


def test_list_fields_are_capped_in_the_schema(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["GenerationRequest"]["properties"]["face_images"]["anyOf"][0]["maxItems"] == 16
    assert schema["FaceRequest"]["properties"]["face_images"]["maxItems"] == 16
    response = client.post("/v1/generations", json={"face_images": ["x"] * 17})
    error = response.json()["error"]
    assert response.status_code == 422 and error["field"] == "face_images" and "16" in error["message"]


def test_a_body_of_millions_of_values_is_refused_before_it_is_parsed(client):
    """40 MiB of ``[],`` (13 million values): counted (commas and openings), never parsed."""
    body = b'{"face_images": [' + b"[]," * (40 * 1024 * 1024 // 3 - 10) + b"[]]}"
    response = client.post("/v1/generations", content=body, headers={"Content-Type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 413 and error["code"] == "payload_too_large"
    assert "more than 100000 JSON values" in error["message"]
    assert client.get("/v1/options").status_code == 200  # and the replica serves on


def test_unknown_keys_get_one_error_naming_the_first(client):
    body = {"face_id": "f_" + "a" * 22, **{f"k{i:07d}": 0 for i in range(50_000)}}
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == {"code": "invalid_parameter", "field": "k0000000",
                                         "message": "k0000000: is not a known parameter"}


def test_stored_files_are_not_cached_or_sniffed(client):
    response = client.post("/v1/generations", json={"face_images": [data_url(face_photo())], **SMALL})
    assert response.status_code == 200, response.text
    download = httpx.get(response.json()["images"][0]["url"], timeout=60)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert download.headers["cache-control"] == "no-store"
    assert download.headers["x-content-type-options"] == "nosniff"


def test_presigned_downloads_from_the_object_store_say_no_store(s3_app):
    with httpx.Client(base_url=s3_app["url"], timeout=120, headers={"Authorization": f"Bearer {KEY_A}"}) as c:
        response = c.post("/v1/generations", json={"face_images": [data_url(face_photo())], **SMALL})
    assert response.status_code == 200, response.text
    download = httpx.get(response.json()["images"][0]["url"], timeout=60)
    assert download.status_code == 200 and download.headers["cache-control"] == "no-store"


def test_health_reveals_no_storage_paths_or_endpoints(s3_app, s3_server):
    response = httpx.get(f"{s3_app['url']}/healthz", timeout=60)
    assert response.status_code == 200
    text = response.text.lower()
    endpoint = urlsplit(s3_server.endpoint)
    for secret in ("hardening", "s3://", str(endpoint.port), endpoint.hostname, "svc", "/tmp"):
        assert secret not in text, secret


def test_ids_are_matched_whole(client):
    face = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [data_url(face_photo())]})
    assert face.status_code == 201
    face_id = face.json()["face_id"]
    assert client.get(f"/v1/faces/{face_id}").status_code == 200
    for suffix in ("%0A", "%0D%0A", "x"):
        response = client.get(f"/v1/faces/{face_id}{suffix}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", suffix
    response = client.get("/v1/generations/g_" + "a" * 22 + "%0A")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "TGA", "ICO"])
def test_only_the_formats_the_api_names_are_decoded(client, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 180, 160)).save(buffer, format=fmt)  # Pillow reads each of these
    photo = "data:application/octet-stream;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/v1/faces/analyze", json={"face_images": [photo]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_image"
    assert "format this service reads" in error["message"] and error["field"] == "face_images[0]"


def test_serve_on_a_public_address_without_keys_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "INSTANTID_API_KEY_SHA256"}
    proc = subprocess.run([INSTANTID, "serve", "--weights", str(tmp_path), "--host", "192.0.2.10"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "--host: serving on 192.0.2.10 (not loopback) needs API keys" in proc.stderr
    assert "INSTANTID_API_KEY_SHA256" in proc.stderr


def stored_under(storage: Path, generation_id: str) -> list[str]:
    return sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*")
                  if p.is_file() and generation_id in p.as_posix() and ".locks" not in p.parts)


def test_a_job_deleted_while_it_renders_never_comes_back(client, local_app):
    """The DELETE is answered at once; the runner (another replica) stops, writes nothing
    more, sends no webhook, and erases what it wrote last: only the deleted mark is left."""
    from ray import serve

    receiver = Receiver()
    try:
        job = client.post("/v1/generations", json={"face_images": [data_url(face_photo())], "async": True,
                                                   "seed": 5, "webhook_url": receiver.url, "width": 192,
                                                   "height": 192, "num_inference_steps": 40}).json()
        started(client, job["id"])
        assert client.delete(f"/v1/generations/{job['id']}").status_code == 204
        runner = serve.get_deployment_handle("JobRunner", app_name="local")
        deadline = time.monotonic() + 300
        while job["id"] in runner.status.remote().result(timeout_s=60)["running"]:
            assert time.monotonic() < deadline, "the runner did not stop"
            time.sleep(0.2)
    finally:
        receiver.close()
    assert stored_under(local_app["storage"], job["id"]) == [f"jobs/deleted/{job['id']}.json"]
    assert client.get(f"/v1/generations/{job['id']}").status_code == 404
    assert receiver.requests == []  # no webhook for a deleted job


def test_a_deleted_generation_is_not_made_again_by_a_retry(client, local_app):
    body = {"face_images": [data_url(face_photo())], **SMALL, "seed": 3}
    headers = {"Idempotency-Key": "security-delete-retry"}
    first = client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == 200, first.text
    generation_id = first.json()["id"]
    assert client.delete(f"/v1/generations/{generation_id}").status_code == 204
    again = client.post("/v1/generations", json=body, headers=headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "canceled"
    assert "deleted" in again.json()["error"]["message"]
    assert stored_under(local_app["storage"], generation_id) == [f"jobs/deleted/{generation_id}.json"]


def test_a_key_holds_at_most_its_cap_of_event_streams(client, url):
    """local_app allows 3 open streams per key: a fourth is 429 before it starts; once one
    is closed, a new one opens. The job waits behind two others, so its streams have nothing
    to write: the place must come back when the client goes, not when a write fails or the
    garbage collector happens to run (a CI run waited two minutes for it)."""
    from contextlib import ExitStack

    big = {"face_images": [data_url(face_photo())], "async": True, "width": 512, "height": 512,
           "num_inference_steps": 150}
    jobs = [client.post("/v1/generations", json={**big, "seed": seed}).json() for seed in (6, 7, 8)]
    events = f"/v1/generations/{jobs[-1]['id']}/events"
    try:
        with ExitStack() as streams:
            opened = [streams.enter_context(client.stream("GET", events)) for _ in range(3)]
            assert [r.status_code for r in opened] == [200] * 3
            fourth = client.get(events)
            assert fourth.status_code == 429 and fourth.json()["error"]["code"] == "rate_limited"
            assert "3 event streams open" in fourth.json()["error"]["message"]
            opened[0].close()
            deadline = time.monotonic() + 60  # the place comes back in well under a second here
            while True:
                with client.stream("GET", events) as again:
                    if again.status_code == 200 or time.monotonic() > deadline:
                        break
                time.sleep(0.5)
            assert again.status_code == 200, again.read()
    finally:
        for job in jobs:
            client.delete(f"/v1/generations/{job['id']}")


def test_who_may_call_a_local_server(monkeypatch):
    from deployments.local import access
    from pipeline.errors import InvalidParameter

    monkeypatch.delenv("INSTANTID_API_KEY_SHA256", raising=False)
    loopback = access("127.0.0.1", [], [])
    assert loopback["auth"]["disabled"] and set(loopback["allowed_hosts"]) == {"127.0.0.1", "localhost", "::1"}
    with pytest.raises(InvalidParameter, match="needs API keys"):
        access("192.0.2.10", [], [])
    keyed = access("192.0.2.10", ["a" * 64], ["api.example.com"])
    assert not keyed["auth"]["disabled"] and keyed["allowed_hosts"] == ["api.example.com"]
    monkeypatch.setenv("INSTANTID_API_KEY_SHA256", "b" * 64)  # keys from the environment count
    from_env = access("192.168.1.5", [], [])
    assert not from_env["auth"]["disabled"] and from_env["auth"]["api_keys_env"] == "INSTANTID_API_KEY_SHA256"
    assert from_env["allowed_hosts"] == []  # a public name is the operator's to give


def test_event_streams_are_counted_while_they_live():
    import gc

    from deployments.security import EventStreams
    from service.errors import RateLimited

    streams = EventStreams(per_key=2, retry_after_s=5)
    held = [streams.open("a"), streams.open("a")]
    with pytest.raises(RateLimited, match="2 event streams open"):
        streams.open("a")
    assert streams.open("b").owner == "b"  # keys do not share a cap (and b's ticket is dropped at once)
    held.pop()
    gc.collect()
    third = streams.open("a")  # the dropped stream gave its place up
    held[0].close()  # a stream that ends gives its place back at once, whoever still holds its ticket
    assert streams.open("a").owner == "a"
    assert third.owner == "a"


@pytest.mark.parametrize("header,host", [("127.0.0.1:8000", "127.0.0.1"), ("LocalHost", "localhost"),
                                         ("[::1]:8000", "::1"), ("[::1]", "::1"), ("evil.example:80", "evil.example")])
def test_host_headers_are_read_without_their_port(header, host):
    from deployments.security import host_name

    assert host_name(header) == host


def test_the_value_count_bounds_a_json_text_from_above():
    from deployments.bodies import json_values_at_most

    for value in ({"a": [1, 2, {"b": []}], "c": "x,y"}, [[]] * 1000, {"face_images": ["QUJD" * 100]}, 7, "s"):
        text = json.dumps(value).encode()
        assert json_values_at_most(text) >= count(json.loads(text))


def count(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(count(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(count(v) for v in value)
    return 1
