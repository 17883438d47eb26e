"""Hardening through real HTTP: abuse limits across two ingress replicas, biometric data
(retention, erasure, no logs), request forgery and path tricks, and a corpus of bad images
with the FaceEmbedder's memory bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.app import build_app
from tests.conftest import (CONSENT, DIGEST_A, DIGEST_B, DIGEST_J, DIGEST_Q, KEY_A, KEY_B, KEY_J, KEY_Q, data_url,
                            face_photo, local_test_options)
from tests.test_images import png_with_declared_size

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
BUCKET = "hardening"
STATS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts" / "reliability-hardening.json"


@pytest.fixture(scope="module")
def hard_url(s3_app):
    return s3_app["url"]


@pytest.fixture(scope="module")
def limited_url(ray_serve, weights_dir, s3_server, s3_app):
    """The app with per-key limits and two ingress replicas that must agree on them.
    Over 60 s beside the suite's other process (15-25 s alone): a whole app's replicas start at once."""
    from ray import serve

    options = local_test_options()
    options["Ingress"].pop("autoscaling_config")
    options["Ingress"]["num_replicas"] = 2
    args = {"weights": str(weights_dir), "storage": "s3://hardening/limited", "s3_endpoint_url": s3_server.endpoint,
            "auth": {"api_key_sha256": [DIGEST_A, DIGEST_B, DIGEST_Q, DIGEST_J], "api_keys_env": ""},
            "rate_limits": {"requests_per_minute": 60, "burst": 10, "images_per_day": 6},
            "limits": {"max_side": 128, "max_steps": 4}, "fairness": {"jobs_per_key": 2},
            "webhook_allowlist": ["127.0.0.1"], "webhook_allow_private": True, "webhook_backoff_s": 0.1}
    serve.run(build_app(args, options), name="limited", route_prefix="/limited")
    yield f"{ray_serve}/limited"
    serve.delete("limited", _blocking=False)


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_rate_limits_hold_across_ingress_replicas(limited_url):
    assert len(replica_pids("Ingress", app="limited")) == 2
    body = {"face_images": [data_url(face_photo())]}

    async def burst():
        async with httpx.AsyncClient(base_url=limited_url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY_B}"}) as c:
            return await asyncio.gather(*(c.post("/v1/faces/analyze", json=body) for _ in range(24)))

    started = time.monotonic()
    responses = []
    for _ in range(5):  # bursts of 24 until the bucket runs dry: the first does unless the machine crawls
        responses += asyncio.run(burst())
        if any(r.status_code == 429 for r in responses):
            break
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in responses]
    # one bucket for the key: a burst of 10, plus one token a second while the burst lasted.
    # (a bucket per ingress replica would have let through up to twice as many)
    assert codes.count(200) <= 10 + int(elapsed) + 1, (codes, elapsed)
    assert codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for response in responses:
        if response.status_code == 429:
            assert error_of(response)["code"] == "rate_limited" and int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("method,path,answer", [("GET", "", 404), ("DELETE", "", 404), ("POST", "/cancel", 409),
                                                ("GET", "/events", 404)])
def test_every_call_of_a_key_counts_against_its_rate(limited_url, method, path, answer):
    """Reads, deletes, cancels and event streams too: each call takes a token from the key's
    bucket before anything else is done for it (here: finding that the generation does not
    exist, or is not running)."""
    target = "/v1/generations/g_" + "n" * 22 + path

    async def burst():
        async with httpx.AsyncClient(base_url=limited_url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY_A}"}) as c:
            return await asyncio.gather(*(c.request(method, target) for _ in range(24)))

    codes = []
    for _ in range(5):  # bursts of 24 until the bucket runs dry
        codes += [r.status_code for r in asyncio.run(burst())]
        if 429 in codes:
            break
    assert 429 in codes and set(codes) <= {answer, 429}, codes


def test_a_key_has_at_most_its_cap_of_unfinished_jobs(limited_url):
    """Jobs whose webhook receiver does not answer yet stay unfinished. Of four sent at the
    same instant (to both ingress replicas) two start, two are refused; one more is refused
    (429) until one of them ends, whichever ingress replica is asked."""
    from tests.test_webhooks import Receiver

    receiver = Receiver(hold=True)
    body = {"face_images": [data_url(face_photo())], "async": True, "webhook_url": receiver.url, **SMALL}

    async def together():
        async with httpx.AsyncClient(base_url=limited_url, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY_J}"}) as c:
            return await asyncio.gather(*(c.post("/v1/generations", json={**body, "seed": n}) for n in range(4)))

    try:
        with client(limited_url, KEY_J) as c:
            first = asyncio.run(together())
            assert sorted(r.status_code for r in first) == [202, 202, 429, 429], [r.text for r in first]
            third = c.post("/v1/generations", json={**body, "seed": 4})
            assert third.status_code == 429 and error_of(third)["code"] == "rate_limited"
            assert "2 jobs not finished" in error_of(third)["message"]
            receiver.release()  # the webhooks are answered: the two jobs finish
            deadline = time.monotonic() + 180
            while True:
                again = c.post("/v1/generations", json={**body, "seed": 5})
                if again.status_code == 202 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert again.status_code == 202, again.text
    finally:
        receiver.release()
        receiver.close()


def test_daily_image_quota(limited_url):
    photo = data_url(face_photo())
    with client(limited_url, KEY_Q) as c:
        assert c.post("/v1/generations", json={"face_images": [photo], "num_images": 3, **SMALL}).status_code == 200
        assert c.post("/v1/generations", json={"face_images": [photo], "num_images": 3, **SMALL}).status_code == 200
        over = c.post("/v1/generations", json={"face_images": [photo], **SMALL})
    assert over.status_code == 429 and error_of(over)["code"] == "quota_exceeded"
    assert int(over.headers["retry-after"]) > 0


def objects(s3_server) -> dict[str, bytes]:
    """Every object the app stored, by key. An object deleted between the listing and its
    read is left out: an earlier test's job may end meanwhile (its input goes)."""
    s3 = s3_server.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="svc/")
    found = {}
    for item in [item for page in pages for item in page.get("Contents", [])]:
        try:
            found[item["Key"]] = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        except s3.exceptions.NoSuchKey:
            continue
    return found


def test_deleting_a_face_erases_every_copy_of_the_embedding(hard_url, s3_server):
    with client(hard_url, KEY_A) as c:
        face_id = c.post("/v1/faces", json={"consent": CONSENT, "face_images": [
            data_url(face_photo(color=(250, 240, 200)))]}).json()["face_id"]
        stored = json.loads(objects(s3_server)[f"svc/faces/{face_id}.json"])
        embedding = stored["face"]["embedding"]
        assert len(embedding) == 512 and stored["expires_at"] > time.time()
        for _ in range(2):  # async renders of the stored face
            c.post("/v1/generations", json={"face_id": face_id, **SMALL}, headers={"Prefer": "respond-async"})
        time.sleep(3)
        assert c.delete(f"/v1/faces/{face_id}").status_code == 204
    needles = [json.dumps(v) for v in embedding[:8]]
    leftovers = [key for key, data in objects(s3_server).items() if any(n.encode() in data for n in needles)]
    assert leftovers == []  # no record, job, generation or cache holds the embedding any more


def test_expired_faces_are_refused_and_swept(hard_url, s3_server):
    from ray import serve

    with client(hard_url, KEY_A) as c:
        face_id = c.post("/v1/faces", json={"consent": CONSENT,
                                            "face_images": [data_url(face_photo())]}).json()["face_id"]
        key = f"svc/faces/{face_id}.json"
        record = json.loads(objects(s3_server)[key])
        record["expires_at"] = time.time() - 1  # as if its retention had passed
        s3_server.client().put_object(Bucket=BUCKET, Key=key, Body=json.dumps(record).encode())
        gone = c.post("/v1/generations", json={"face_id": face_id, **SMALL})
    assert gone.status_code == 404 and error_of(gone)["field"] == "face_id"
    assert key not in objects(s3_server)
    # the sweep finds what nobody asked for again
    other = json.loads(json.dumps(record) if record else "{}")
    other["expires_at"] = time.time() - 1
    s3_server.client().put_object(Bucket=BUCKET, Key="svc/faces/f_" + "z" * 22 + ".json",
                                  Body=json.dumps(other).encode())
    swept = serve.get_deployment_handle("Janitor", app_name="s3app").sweep.remote().result(timeout_s=60)
    assert swept["faces"] >= 1 and "svc/faces/f_" + "z" * 22 + ".json" not in objects(s3_server)


def test_keys_and_embeddings_never_reach_the_logs(hard_url, s3_server):
    import ray

    with client(hard_url, KEY_A) as c:
        face = c.post("/v1/faces", json={"consent": CONSENT,
                                         "face_images": [data_url(face_photo(color=(240, 250, 230)))]}).json()
    embedding = json.loads(objects(s3_server)[f"svc/faces/{face['face_id']}.json"])["face"]["embedding"]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    texts = [p.read_bytes() for p in logs.rglob("*") if p.is_file()]
    assert texts and not [t for t in texts if KEY_A.encode() in t or DIGEST_A.encode() in t]
    for value in embedding[:4]:
        assert not [t for t in texts if repr(value).encode() in t]


@pytest.mark.parametrize(
    "ref,status,code",
    [("http://169.254.169.254/latest/meta-data/iam", 422, "invalid_parameter"),
     ("https://example.com/me.png", 422, "invalid_parameter"),
     ("file:///etc/passwd", 422, "invalid_parameter"),
     ("s3://hardening/svc/faces/anything.json", 422, "invalid_parameter"),  # the service's own bucket: not an input
     ("s3://hardening-uploads/../hardening/svc/x", 422, "invalid_parameter"),
     ("data:text/html,<script>alert(1)</script>", 400, "invalid_image"),
     ("/etc/passwd", 400, "invalid_image")],
)
def test_image_references_cannot_reach_anything_but_allowed_buckets(hard_url, ref, status, code):
    with client(hard_url, KEY_A) as c:
        response = c.post("/v1/faces/analyze", json={"face_images": [ref]})
    assert response.status_code == status and error_of(response)["code"] == code, response.text


@pytest.mark.parametrize("path", ["/v1/faces/..%2F..%2Fetc%2Fpasswd", "/v1/faces/f_%2E%2E%2Fgenerations",
                                  "/v1/generations/..%2Ffaces%2Fx", "/v1/files/..%2F..%2Fetc%2Fpasswd",
                                  "/v1/files/faces/f_x.json?expires=9999999999&signature=00"])
def test_ids_and_keys_from_the_url_never_become_paths(hard_url, path):
    with client(hard_url, KEY_A) as c:
        response = c.get(path)
    assert response.status_code in (403, 404) and error_of(response)["code"] in ("forbidden", "not_found")


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bad_image_corpus() -> list[tuple[str, bytes, int, str | None]]:
    """(name, bytes, expected status, expected error code) — generated, nothing shipped."""
    face = face_photo(size=(300, 300), blobs=((150, 150, 60),))
    rotated = face_photo(size=(320, 200), blobs=((80, 100, 40),)).transpose(Image.Transpose.ROTATE_90)
    exif = rotated.getexif()
    exif[0x0112] = 6
    frames = [face, Image.new("RGB", face.size)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    sixteen = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    alpha = face.convert("RGBA")
    alpha.putalpha(200)
    jpeg = encoded(face, "JPEG")
    return [
        ("empty", b"", 400, "invalid_image"),
        ("truncated png", encoded(face)[:200], 400, "invalid_image"),
        ("truncated jpeg", jpeg[: len(jpeg) // 3], 400, "invalid_image"),
        ("text as .png", b"name,age\nbob,3\n", 400, "invalid_image"),
        ("jpeg called png", jpeg, 200, None),
        ("decompression bomb", png_with_declared_size(30000, 30000), 413, "image_too_large"),
        ("huge declared size", png_with_declared_size(200000, 10), 413, "image_too_large"),
        ("too many bytes", b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024 + 1), 413, "image_too_large"),
        ("16-bit grayscale", encoded(sixteen), 200, None),
        ("cmyk jpeg", encoded(face.convert("CMYK"), "JPEG"), 200, None),
        ("grayscale", encoded(face.convert("L")), 200, None),
        ("alpha", encoded(alpha), 200, None),
        ("palette", encoded(face.convert("P")), 200, None),
        ("animated gif", gif.getvalue(), 200, None),
        ("exif rotated", encoded(rotated, "JPEG", exif=exif), 200, None),
        ("1x1", encoded(Image.new("RGB", (1, 1), "white")), 400, "invalid_image"),
        ("many faces", encoded(face_photo(size=(640, 320), blobs=((100, 160, 40), (320, 160, 80), (540, 160, 50)))),
         200, None),
        ("no face", encoded(Image.new("RGB", (400, 300), (30, 30, 30))), 422, "no_face"),
    ]


def replica_pids(deployment: str, app: str = "s3app") -> list[int]:
    from ray._private.state import actors

    return [info["Pid"] for info in actors().values()
            if info["State"] == "ALIVE" and info["ActorClassName"] == f"ServeReplica:{app}:{deployment}"]


def replica_rss(deployment: str, app: str = "s3app") -> int:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in replica_pids(deployment, app))


def test_bad_image_corpus_gets_specific_answers_with_bounded_memory(hard_url):
    corpus = bad_image_corpus()
    results = {}
    before = None
    with client(hard_url, KEY_A) as c:
        for round_ in range(2):  # the second round measures growth after warm-up
            if round_ == 1:
                before = replica_rss("FaceEmbedder")
            for name, data, status, code in corpus:
                response = c.post("/v1/faces/analyze", json={"face_images": [base64.b64encode(data).decode()]})
                results[name] = (response.status_code, response.json().get("error", {}).get("code"))
                assert response.status_code == status, (name, response.text)
                if code:
                    assert results[name][1] == code, (name, response.text)
                    assert response.json()["error"]["field"] == "face_images[0]"
        growth = replica_rss("FaceEmbedder") - before
    assert growth < 150 * 1024 * 1024, f"the face stage grew by {growth / 2**20:.0f} MiB over one corpus"
    STATS.parent.mkdir(parents=True, exist_ok=True)
    STATS.write_text(json.dumps({"bad_inputs_tried": 2 * len(corpus), "kinds": len(corpus),
                                 "face_stage_growth_mib": round(growth / 2**20, 1), "results": results}, indent=1))
