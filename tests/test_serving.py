"""The Serve application through real HTTP: a real Ray, the real app on fixture weights,
SeaweedFS as its object store (the session's shared S3 app; a one-slot app for overload and
timeouts)."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.app import build_app
from tests.conftest import CONSENT, DIGEST_A, DIGEST_B, KEY_A, KEY_B, data_url, face_photo, local_test_options
from tests.test_images import png_with_declared_size

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def s3_env(s3_server, s3_app):
    s3_server.client().create_bucket(Bucket="private")
    return {**s3_app, "server": s3_server}


@pytest.fixture(scope="module")
def app_url(s3_app):
    return s3_app["url"]


@pytest.fixture(scope="module")
def tight_url(ray_serve, weights_dir, s3_server, s3_app):
    """An app with one render slot and a one-deep queue, for overload and timeouts; its
    ingress sends one render at a time and lets one more per key wait. Over 60 s beside the
    suite's other process (15-25 s alone): a whole app's replicas start at once."""
    from ray import serve

    options = local_test_options(max_ongoing_requests=1, max_queued_requests=1, graceful_shutdown_timeout_s=5)
    options["Generator"]["user_config"].update(max_batch_images=1, batch_wait_timeout_s=0.0)
    args = {"weights": str(weights_dir), "storage": "s3://hardening/tight", "s3_endpoint_url": s3_server.endpoint,
            "auth": {"api_key_sha256": [DIGEST_A, DIGEST_B], "api_keys_env": ""},
            "limits": {"max_num_images": 1, "max_steps": 150, "max_side": 512},
            "fairness": {"renders_at_once": 1, "waiting_per_key": 1}}
    serve.run(build_app(args, options), name="tight", route_prefix="/tight")
    yield f"{ray_serve}/tight"
    serve.delete("tight", _blocking=False)


def auth(key: str = KEY_A) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def photo() -> str:
    return data_url(face_photo())


def generate(client, body: dict, key: str = KEY_A) -> httpx.Response:
    return client.post("/v1/generations", json=body, headers=auth(key))


def fetch_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def pixels_at(url: str) -> np.ndarray:
    return np.asarray(fetch_image(url).convert("RGB"))


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    if field is not None:
        assert body["error"].get("field") == field, body
    return body


# ----------------------------------------------------------------------------- happy paths


def test_health_lists_every_stage_and_docs_are_served(client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.text
    stages = response.json()["stages"]
    # (no rate limits are configured for this app: no RateLimiter is deployed)
    assert [s["stage"] for s in stages] == ["face", "generator", "postprocessor", "jobrunner", "janitor"]
    assert all(s["status"] == "HEALTHY" and s["replicas"]["RUNNING"] >= 1 for s in stages), stages
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/generations", "/v1/faces", "/v1/faces/{face_id}"} <= set(schema["paths"])


def test_generation_is_stored_in_s3_and_fetched_through_its_presigned_url(client, photo, s3_env):
    response = generate(client, {"face_images": [photo], "prompt": "a portrait", "seed": 7, "num_images": 2, **SMALL})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("g_") and [i["seed"] for i in body["images"]] == [7, 8]
    assert set(body["face"]) == {"bbox", "kps", "det_score", "image_size"}
    assert {"face", "denoise", "total"} <= set(body["timings_ms"])
    for item in body["images"]:
        assert item["url"].startswith(s3_env["server"].endpoint) and "X-Amz-Signature" in item["url"]
        image = fetch_image(item["url"])
        assert image.format == "PNG" and image.size == (64, 64) == (item["width"], item["height"])
    # an unsigned URL to the same object is refused by the store
    unsigned = body["images"][0]["url"].split("?")[0]
    assert httpx.get(unsigned).status_code == 403


def test_each_output_carries_the_watermark_and_a_signed_c2pa_manifest_naming_its_generation(client, photo):
    """The smallest picture that carries the mark (256x256 pixels); the 64x64 ones of the
    other tests are too small to, and say so. Every output carries the manifest."""
    from pipeline.watermark import Watermark

    response = generate(client, {"face_images": [photo], "seed": 3, "width": 256, "height": 256,
                                 "num_inference_steps": 1, "output_format": "jpeg", "quality": 90})
    assert response.status_code == 200, response.text
    body = response.json()
    [image] = body["images"]
    assert image["watermarked"] is True and image["c2pa"] is True
    stored = httpx.get(image["url"], timeout=60).content
    reading = Watermark().read(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")))
    assert reading.found and reading.this_service and reading.generation_id == body["id"]
    small = generate(client, {"face_images": [photo], "seed": 3, **SMALL})
    assert small.status_code == 200 and small.json()["images"][0]["watermarked"] is False
    assert small.json()["images"][0]["c2pa"] is True

    # POST /v1/verify reads both back from the file as the client got it; nothing from a plain photo
    verified = client.post("/v1/verify", json={"image": base64.b64encode(stored).decode()}, headers=auth())
    assert verified.status_code == 200, verified.text
    manifest = verified.json().pop("c2pa")
    assert verified.json() | {"c2pa": None} == {
        "watermark": {"found": True, "this_service": True, "generation_id": body["id"], "id_sha256_prefix": None},
        "c2pa": None, "width": 256, "height": 256}
    assert manifest["valid"] and manifest["trusted"] and manifest["created_by_algorithm"] and not manifest["errors"]
    assert manifest["generator"].startswith("instantid ") and manifest["signer"].startswith("instantid test suite")
    assert {k: manifest["generation"][k] for k in ("generation_id", "seed", "steps", "width", "height", "mode")} == {
        "generation_id": body["id"], "seed": 3, "steps": 1, "width": 256, "height": 256, "mode": "text2img"}
    # one bit of the picture's data changed (mid-scan, away from JPEG's 0xFF markers): the
    # manifest is still there, and no longer valid
    tampered, at = bytearray(stored), len(stored) // 2
    while not (2 <= tampered[at] <= 0xFD and tampered[at - 1] != 0xFF):
        at += 1
    tampered[at] ^= 1
    changed = client.post("/v1/verify", json={"image": base64.b64encode(bytes(tampered)).decode()}, headers=auth())
    assert changed.status_code == 200 and changed.json()["c2pa"]["valid"] is False
    assert changed.json()["c2pa"]["errors"]
    plain = client.post("/v1/verify", json={"image": photo}, headers=auth())
    assert plain.status_code == 200 and plain.json()["watermark"]["found"] is False and plain.json()["c2pa"] is None
    assert_error(client.post("/v1/verify", json={"image": "bm90IGFuIGltYWdl"}, headers=auth()), 400,
                 "invalid_image", "image")
    assert client.post("/v1/verify", json={"image": photo}).status_code == 401


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, photo, fmt, pil):
    response = generate(client, {"face_images": [photo], "output_format": fmt, "quality": 70, "seed": 1, **SMALL})
    assert response.status_code == 200, response.text
    assert fetch_image(response.json()["images"][0]["url"]).format == pil


def test_s3_photos_are_uploads_of_the_calling_key_only(client, s3_env):
    """A photo is uploaded through a presigned POST under the key's own prefix; another key
    naming it gets the same answer as for an object that does not exist."""
    from deployments.auth import owner_of

    buffer = io.BytesIO()
    face_photo().save(buffer, format="PNG")
    ticket = client.post("/v1/uploads", json={"content_type": "image/png"}, headers=auth())
    assert ticket.status_code == 201, ticket.text
    ticket = ticket.json()
    mine = f"s3://hardening-uploads/uploads/{owner_of(DIGEST_A)}/"
    assert ticket["image"].startswith(mine) and ticket["max_bytes"] == 2 * 1024 * 1024
    sent = httpx.post(ticket["url"], data=ticket["fields"], files={"file": ("me.png", buffer.getvalue(), "image/png")})
    assert sent.status_code in (200, 201, 204), sent.text
    ok = generate(client, {"face_images": [ticket["image"]], "seed": 3, **SMALL})
    assert ok.status_code == 200, ok.text
    # another key: its upload is not theirs, and they cannot tell it from one that does not exist
    theirs = generate(client, {"face_images": [ticket["image"]], **SMALL}, key=KEY_B)
    nothing = generate(client, {"face_images": [mine + "nothing.png"], **SMALL}, key=KEY_B)
    assert_error(theirs, 422, "invalid_parameter", "face_images[0]")
    assert theirs.json() == nothing.json()
    # the key's own prefix: a missing photo is said to be missing
    missing = generate(client, {"face_images": [mine + "missing.png"], **SMALL})
    assert_error(missing, 422, "invalid_parameter", "face_images[0]")
    assert "no object" in missing.json()["error"]["message"]
    s3_env["server"].client().put_object(Bucket="private", Key="me.png", Body=buffer.getvalue())
    assert_error(generate(client, {"face_images": ["s3://private/me.png"], **SMALL}), 422, "invalid_parameter",
                 "face_images[0]")
    assert_error(generate(client, {"face_images": ["http://127.0.0.1:1/me.png"], **SMALL}), 422,
                 "invalid_parameter", "face_images[0]")
    # the store holds an upload to its size cap and its key
    second = client.post("/v1/uploads", json={"content_type": "image/png"}, headers=auth()).json()
    too_big = httpx.post(second["url"], data=second["fields"],
                         files={"file": ("big.png", b"x" * (second["max_bytes"] + 1), "image/png")})
    assert too_big.status_code == 400 and "EntityTooLarge" in too_big.text
    elsewhere = {**second["fields"], "key": f"uploads/{owner_of(DIGEST_B)}/planted.png"}
    assert httpx.post(second["url"], data=elsewhere, files={"file": ("x.png", b"x", "image/png")}).status_code == 403


def test_register_a_face_render_it_then_erase_it(client, photo, s3_env):
    """With a consent attestation only; the registration, the use and the erasure each leave
    one audit entry (ids and time, no image or embedding)."""
    unattested = client.post("/v1/faces", json={"face_images": [photo]}, headers=auth())
    assert_error(unattested, 422, "invalid_parameter", "consent")
    assert_error(client.post("/v1/faces", json={"consent": {**CONSENT, "basis": ""}, "face_images": [photo]},
                             headers=auth()), 422, "invalid_parameter", "consent.basis")
    created = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]}, headers=auth())
    assert created.status_code == 201, created.text
    face_id = created.json()["face_id"]
    shown = client.get(f"/v1/faces/{face_id}", headers=auth())
    assert shown.status_code == 200 and "embedding" not in shown.text
    assert shown.json()["face"] == created.json()["face"]
    consent = shown.json()["consent"]
    assert {k: consent[k] for k in CONSENT} == CONSENT and consent["attested_at"] > 0
    by_id = generate(client, {"face_id": face_id, "prompt": "noir", "seed": 11, **SMALL})
    by_photo = generate(client, {"face_images": [photo], "prompt": "noir", "seed": 11, **SMALL})
    assert by_id.status_code == by_photo.status_code == 200
    a = np.asarray(fetch_image(by_id.json()["images"][0]["url"]), dtype=int)
    b = np.asarray(fetch_image(by_photo.json()["images"][0]["url"]), dtype=int)
    assert np.abs(a - b).max() <= 1  # the stored face renders as the photo does
    assert client.delete(f"/v1/faces/{face_id}", headers=auth()).status_code == 204
    assert_error(client.get(f"/v1/faces/{face_id}", headers=auth()), 404, "not_found")
    assert_error(generate(client, {"face_id": face_id, **SMALL}), 404, "not_found", "face_id")

    from service.audit import entries
    from service.storage import open_storage

    store = open_storage(f"s3://{s3_env['bucket']}/{s3_env['prefix']}", endpoint_url=s3_env["server"].endpoint)
    log = [e for e in entries(store) if e["face_id"] == face_id]
    assert [(e["event"], e.get("generation_id")) for e in log] == [
        ("face_registered", None), ("face_used", by_id.json()["id"]), ("face_erased", None)]
    assert all(set(e) <= {"event", "at", "owner", "face_id", "generation_id", "reason"} for e in log)
    assert store.list_keys(f"uses/{face_id}") == []  # its links to what it made go with it
    assert len({e["owner"] for e in log}) == 1 and log[-1]["reason"] == "deleted"


def test_erasing_a_face_with_cascade_erases_every_generation_made_from_it(client, photo, s3_env):
    """Sync and async generations from a registered face go with it (images, records, job),
    the response says how many; a generation from photos stays; the audit entry counts them."""
    face_id = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]},
                          headers=auth()).json()["face_id"]
    synced = generate(client, {"face_id": face_id, **SMALL}).json()["id"]
    queued = client.post("/v1/generations", json={"face_id": face_id, "async": True, **SMALL}, headers=auth())
    assert queued.status_code == 202, queued.text
    from_photo = generate(client, {"face_images": [photo], **SMALL}).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/generations/{queued.json()['id']}", headers=auth()).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the async generation did not finish"
        time.sleep(0.2)
    assert_error(client.delete(f"/v1/faces/{face_id}?cascade=maybe", headers=auth()), 422, "invalid_parameter",
                 "cascade")
    erased = client.delete(f"/v1/faces/{face_id}?cascade=true", headers=auth())
    assert erased.status_code == 200, erased.text
    assert erased.json() == {"face_id": face_id, "generations_erased": 2}
    s3 = s3_env["server"].client()
    for gone in (synced, queued.json()["id"]):
        assert_error(client.get(f"/v1/generations/{gone}", headers=auth()), 404, "not_found")
        for folder in ("generations", "jobs"):
            listed = s3.list_objects_v2(Bucket=s3_env["bucket"], Prefix=f"{s3_env['prefix']}/{folder}/{gone}")
            assert listed.get("KeyCount", 0) == 0, (folder, gone)
    kept = client.get(f"/v1/generations/{from_photo}", headers=auth())
    assert kept.status_code == 200 and fetch_image(kept.json()["images"][0]["url"])
    assert_error(client.get(f"/v1/faces/{face_id}", headers=auth()), 404, "not_found")
    assert_error(client.delete(f"/v1/faces/{face_id}?cascade=true", headers=auth()), 404, "not_found")

    from service.audit import entries
    from service.storage import open_storage

    store = open_storage(f"s3://{s3_env['bucket']}/{s3_env['prefix']}", endpoint_url=s3_env["server"].endpoint)
    log = [e for e in entries(store) if e["face_id"] == face_id]
    assert [e["event"] for e in log] == ["face_registered", "face_used", "face_used", "face_erased"]
    assert {e["generation_id"] for e in log[1:3]} == {synced, queued.json()["id"]}
    assert log[-1]["generations"] == 2 and log[-1]["reason"] == "deleted"
    assert store.list_keys(f"uses/{face_id}") == []


def test_generation_records_can_be_read_again_and_deleted(client, photo, s3_env):
    body = generate(client, {"face_images": [photo], "seed": 5, **SMALL}).json()
    again = client.get(f"/v1/generations/{body['id']}", headers=auth())
    assert again.status_code == 200 and again.json()["images"][0]["seed"] == 5
    fetch_image(again.json()["images"][0]["url"])
    assert client.delete(f"/v1/generations/{body['id']}", headers=auth()).status_code == 204
    assert_error(client.get(f"/v1/generations/{body['id']}", headers=auth()), 404, "not_found")
    listed = s3_env["server"].client().list_objects_v2(Bucket=s3_env["bucket"],
                                                       Prefix=f"{s3_env['prefix']}/generations/{body['id']}")
    assert listed.get("KeyCount", 0) == 0


# ----------------------------------------------------------------------------- auth


def test_missing_or_wrong_keys_get_401(client, photo):
    response = client.post("/v1/generations", json={"face_images": [photo], **SMALL})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(generate(client, {"face_images": [photo], **SMALL}, key="iid_not-a-key"), 401, "unauthorized")
    assert_error(client.get("/v1/faces/f_" + "a" * 22, headers={"Authorization": "Basic abc"}), 401, "unauthorized")


def test_a_key_reads_and_deletes_only_its_own_faces_and_images(client, photo):
    face_id = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]},
                          headers=auth(KEY_A)).json()["face_id"]
    assert_error(client.get(f"/v1/faces/{face_id}", headers=auth(KEY_B)), 403, "forbidden")
    assert_error(client.delete(f"/v1/faces/{face_id}", headers=auth(KEY_B)), 403, "forbidden")
    assert_error(generate(client, {"face_id": face_id, **SMALL}, key=KEY_B), 403, "forbidden")
    generation = generate(client, {"face_id": face_id, **SMALL}, key=KEY_A).json()["id"]
    assert_error(client.get(f"/v1/generations/{generation}", headers=auth(KEY_B)), 403, "forbidden")
    assert_error(client.delete(f"/v1/generations/{generation}", headers=auth(KEY_B)), 403, "forbidden")
    assert client.get(f"/v1/faces/{face_id}", headers=auth(KEY_A)).status_code == 200


# ----------------------------------------------------------------------------- errors


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_undecodable_or_non_image_data_is_400(client):
    assert_error(generate(client, {"face_images": ["%%% not base64 %%%"], **SMALL}), 400, "invalid_image",
                 "face_images[0]")
    assert_error(generate(client, {"face_images": [b64(b"just some text")], **SMALL}), 400, "invalid_image",
                 "face_images[0]")
    truncated = data_url(face_photo())[:400]
    assert_error(generate(client, {"face_images": [truncated], **SMALL}), 400, "invalid_image", "face_images[0]")
    response = client.post("/v1/generations", content=b"{not json", headers={**auth(), "content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


def test_oversized_bodies_images_and_pixel_counts_are_413(client):
    huge_body = {"face_images": ["A" * (5 * 1024 * 1024)]}
    assert_error(generate(client, huge_body), 413, "payload_too_large")
    big_image = b64(b"\x89PNG" + b"\0" * (2 * 1024 * 1024 + 10))
    assert_error(generate(client, {"face_images": [big_image], **SMALL}), 413, "image_too_large", "face_images[0]")
    bomb = b64(png_with_declared_size(100_000, 100_000))
    assert_error(generate(client, {"face_images": [bomb], **SMALL}), 413, "image_too_large", "face_images[0]")


def test_no_face_is_422(client):
    black = data_url(Image.new("RGB", (200, 200)))
    assert_error(generate(client, {"face_images": [black], **SMALL}), 422, "no_face", "face_images[0]")
    assert_error(client.post("/v1/faces", json={"consent": CONSENT, "face_images": [black]}, headers=auth()), 422,
                 "no_face")


@pytest.mark.parametrize(
    "change,field",
    [({"width": 100}, "width"), ({"num_inference_steps": 0}, "num_inference_steps"), ({"scheduler": "heun"}, "scheduler"),
     ({"style": "Baroque"}, "style"), ({"colour": "red"}, "colour"), ({"seed": -3}, "seed"),
     ({"num_images": 9}, "num_images"), ({"width": 2048}, "width"), ({"lora": "lcm"}, "lora"),
     ({"output_format": "gif"}, "output_format"), ({"face_images": []}, "face_images"),
     ({"face_id": "f_" + "b" * 22}, "face_images")],
)
def test_invalid_parameters_are_422_naming_the_field(client, photo, change, field):
    body = {"face_images": [photo], **SMALL, **change}
    assert_error(generate(client, body), 422, "invalid_parameter", field)


def test_unknown_face_ids_are_404(client):
    assert_error(generate(client, {"face_id": "f_" + "x" * 22, **SMALL}), 404, "not_found", "face_id")
    assert_error(client.get("/v1/faces/../../etc/passwd", headers=auth()), 404, "not_found")
    assert_error(client.get("/v1/faces/not-an-id", headers=auth()), 404, "not_found")


# ----------------------------------------------------------------------------- batching


def test_concurrent_compatible_requests_are_batched_and_equal_unbatched_results(client, app_url, photo):
    face_id = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]},
                          headers=auth()).json()["face_id"]
    bodies = [{"face_id": face_id, "prompt": p, "seed": s, "ip_adapter_scale": sc, **SMALL}
              for p, s, sc in (("a", 1, 0.8), ("b", 2, 0.5), ("c", 3, 1.0), ("d", 4, 0.0))]
    odd = {"face_id": face_id, "seed": 9, "width": 96, "height": 64, "num_inference_steps": 2}

    async def burst():
        async with httpx.AsyncClient(base_url=app_url, timeout=120, headers=auth()) as c:
            return await asyncio.gather(*(c.post("/v1/generations", json=b) for b in [*bodies, odd]))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes[:4]) > 1, sizes  # compatible requests shared a batch
    assert sizes[4] == 1  # the one with another size never joins them
    for body, response in zip(bodies, responses):
        alone = generate(client, body)
        assert alone.json()["batch_size"] == 1
        a = np.asarray(fetch_image(response.json()["images"][0]["url"]), dtype=int)
        b = np.asarray(fetch_image(alone.json()["images"][0]["url"]), dtype=int)
        assert np.abs(a - b).max() <= 1, body


# ----------------------------------------------------------------------------- overload, timeout


def test_overload_is_503_with_retry_after(tight_url, photo):
    """Eight requests at once to one render slot and a one-deep queue: some are turned away
    at once; what was admitted succeeds (the app's request timeout is minutes)."""
    async def burst():
        async with httpx.AsyncClient(base_url=tight_url, timeout=300, headers=auth()) as c:
            body = {"face_images": [photo], "width": 64, "height": 64, "num_inference_steps": 2}
            return await asyncio.gather(*(c.post("/v1/generations", json={**body, "seed": i}) for i in range(8)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}, codes
    for response in responses:
        if response.status_code == 503:
            assert_error(response, 503, "overloaded")
            assert int(response.headers["retry-after"]) > 0


def test_a_key_flooding_the_service_does_not_turn_another_keys_requests_away(tight_url, photo):
    """Key A sends six renders at once: one renders, one waits, the others are refused (503,
    for A only; when A's first render ends before all six have arrived, a later one takes its
    place, so "the others" are up to four). Key B's render, sent once A's first refusal came
    back, waits for its turn behind A's, not behind A's whole burst, and succeeds."""
    import threading

    body = {"face_images": [photo], "width": 128, "height": 128, "num_inference_steps": 20}
    flood: list[httpx.Response] = []

    async def burst():
        async with httpx.AsyncClient(base_url=tight_url, timeout=300, headers=auth()) as c:
            for done in asyncio.as_completed([c.post("/v1/generations", json={**body, "seed": i}) for i in range(6)]):
                flood.append(await done)

    thread = threading.Thread(target=lambda: asyncio.run(burst()))
    thread.start()
    deadline = time.monotonic() + 240
    while not any(r.status_code == 503 for r in list(flood)):
        assert time.monotonic() < deadline and thread.is_alive(), [r.status_code for r in flood]
        time.sleep(0.05)
    with httpx.Client(base_url=tight_url, timeout=300, headers=auth(KEY_B)) as c:
        theirs = c.post("/v1/generations", json={**body, "seed": 99})
    thread.join(timeout=600)
    assert theirs.status_code == 200, theirs.text
    codes = sorted(r.status_code for r in flood)
    assert len(codes) == 6 and set(codes) == {200, 503} and codes.count(200) >= 2, codes
    for response in flood:
        if response.status_code == 503:
            assert_error(response, 503, "overloaded")


def test_timeout_is_504_and_frees_the_replica(tight_url, photo):
    """``Prefer: wait=1`` on a render that takes far longer (150 steps at 512x512): the 504 is
    certain, and the abandoned render stops at its next step, so the one-slot app answers
    the next request (503 while its slot is still taken)."""
    with httpx.Client(base_url=tight_url, timeout=300, headers=auth()) as c:
        slow = {"face_images": [photo], "width": 512, "height": 512, "num_inference_steps": 150, "seed": 1}
        assert_error(c.post("/v1/generations", json=slow, headers={"Prefer": "wait=1"}), 504, "timeout")
        deadline = time.monotonic() + 240
        while True:
            response = c.post("/v1/generations", json={"face_images": [photo], **SMALL})
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- ray, metrics


def test_every_listener_of_ray_and_the_app_is_on_loopback(app_url, tight_url):
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
    listeners = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert len(listeners) > 10  # gcs, raylet, workers, replicas, the HTTP proxy, SeaweedFS...
    wide = [(c.laddr, psutil.Process(c.pid).name()) for c in listeners
            if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not wide, wide


def test_application_metrics_are_exported_with_serves(client, photo):
    import ray

    assert generate(client, {"face_images": [photo], "seed": 2, **SMALL}).status_code == 200
    assert_error(generate(client, {"face_images": [photo], "width": 100}), 422, "invalid_parameter")
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = ["instantid_images_generated_total", "instantid_batch_size", "instantid_face_latency_ms",
              "instantid_diffusion_seconds_per_step", "instantid_errors_total", "serve_num_http_requests"]
    deadline, text = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    assert 'code="invalid_parameter"' in text


# ----------------------------------------------------------------------------- idempotency


def render_log(s3_env, generation_id: str) -> list[str]:
    listed = s3_env["server"].client().list_objects_v2(
        Bucket=s3_env["bucket"], Prefix=f"{s3_env['prefix']}/generations/{generation_id}/renders/")
    return [item["Key"] for item in listed.get("Contents", [])]


def test_idempotency_key_replays_the_first_result_and_renders_once(client, app_url, photo, s3_env):
    body = {"face_images": [photo], "prompt": "same", **SMALL}  # no seed: derived from the key
    headers = {**auth(), "Idempotency-Key": "order-42"}
    first = client.post("/v1/generations", json=body, headers=headers)
    second = client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    assert first.json()["id"] == second.json()["id"]
    assert [i["seed"] for i in first.json()["images"]] == [i["seed"] for i in second.json()["images"]]
    assert fetch_image(second.json()["images"][0]["url"]).tobytes() == fetch_image(
        first.json()["images"][0]["url"]).tobytes()
    assert len(render_log(s3_env, first.json()["id"])) == 1
    # another key of another owner is another generation; the same key with another body is refused
    other = client.post("/v1/generations", json=body, headers={**auth(KEY_B), "Idempotency-Key": "order-42"})
    assert other.status_code == 200 and other.json()["id"] != first.json()["id"]
    assert_error(client.post("/v1/generations", json={**body, "prompt": "changed"}, headers=headers), 422,
                 "invalid_parameter", "Idempotency-Key")


def test_concurrent_retries_with_one_key_render_once(app_url, photo, s3_env):
    body = {"face_images": [photo], "seed": 31, **SMALL}

    async def both():
        async with httpx.AsyncClient(base_url=app_url, timeout=120,
                                     headers={**auth(), "Idempotency-Key": "retry-storm"}) as c:
            return await asyncio.gather(*(c.post("/v1/generations", json=body) for _ in range(3)))

    responses = asyncio.run(both())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(render_log(s3_env, responses[0].json()["id"])) == 1


# ----------------------------------------------------------------------------- stages under load
# The Generator is driven through its handle here, so a test knows for certain what runs and
# what waits: a render that sent its first step is rendering; a call refused with
# BackPressureError proves the replica and its queue full.


def generation(face, generation_id: str, **params):
    from deployments.messages import GenerationJob
    from pipeline.params import GenerationParams
    from service.batching import RenderRequest
    from service.records import GenerationRecord, OutputSpec, StoredFace

    stored = StoredFace.of(face)
    return GenerationJob(RenderRequest(generation_id, GenerationParams(**params), face), OutputSpec(),
                         GenerationRecord(id=generation_id, owner="tests", face=stored.public()))


def generate_stream(app_name: str, job):
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=app_name).options(stream=True).generate.remote(job)


SLOW = {"width": 512, "height": 512, "num_inference_steps": 150, "seed": 1}


def test_health_answers_while_the_generator_is_full(tight_url, face):
    """One render running and one call queued fill the one-slot app's Generator (a third is
    refused); /healthz still answers 200 at once: it asks Serve's controller, not the busy
    replica's queue."""
    from ray.serve.exceptions import BackPressureError

    running = generate_stream("tight", generation(face, "g_" + "r" * 22, **SLOW))
    events = iter(running)
    assert next(events) == {"type": "stage", "stage": "rendering"}  # the replica has the call
    assert next(events)["type"] == "progress"  # rendering
    queued = generate_stream("tight", generation(face, "g_" + "q" * 22, seed=2, **SMALL))
    try:
        with pytest.raises(BackPressureError):  # full: the slot and the queue are taken
            for _ in generate_stream("tight", generation(face, "g_" + "x" * 22, seed=3, **SMALL)):
                pass
        response = httpx.get(f"{tight_url}/healthz", timeout=60)
        assert response.status_code == 200, response.text
        assert {s["stage"]: s["status"] for s in response.json()["stages"]}["generator"] == "HEALTHY"
    finally:
        queued.cancel()
        running.cancel()


def test_a_call_cancelled_while_queued_in_a_batch_does_not_cancel_a_later_one_with_its_id(app_url, face):
    """A call waits in the Generator's batch queue behind a long render and is cancelled
    there (its client gave up); a later call with the same generation id (an Idempotency-Key
    retry) renders on that replica and succeeds."""
    from ray import serve

    generator = serve.get_deployment_handle("Generator", app_name="s3app")
    running = generate_stream("s3app", generation(face, "g_" + "s" * 22, **SLOW))
    events = iter(running)
    assert next(events) == {"type": "stage", "stage": "rendering"} and next(events)["type"] == "progress"
    retried = generation(face, "g_" + "t" * 22, seed=77, **SMALL)
    waiting = generate_stream("s3app", retried)
    deadline = time.monotonic() + 240
    while not generator.status.remote().result(timeout_s=60)["waiting"]:
        assert time.monotonic() < deadline, "the call never reached the batch queue"
        time.sleep(0.1)
    waiting.cancel()
    running.cancel()
    events = list(generate_stream("s3app", retried))
    assert events[-1]["type"] == "result" and events[-1]["result"].record.id == retried.request.id


# ----------------------------------------------------------------------------- img2img, inpainting


def job_end(client, generation_id: str) -> dict:
    """An async job's view once it has ended (waiting minutes at most: a slow machine is no failure)."""
    deadline = time.monotonic() + 300
    while (view := client.get(f"/v1/generations/{generation_id}", headers=auth()).json())["status"] not in (
            "succeeded", "failed", "canceled"):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    return view


def test_inpainting_over_http_sync_and_async_keeps_the_unmasked_pixels(client, photo):
    """A face put into a picture: keypoints from the picture's face, the picture's own
    pixels outside the mask; the async job (its picture kept in the job's input) makes the
    same bytes."""
    scene = face_photo(size=(128, 128), blobs=((64, 64, 40),))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (24, 16, 104, 104))
    body = {"face_images": [photo], "image": data_url(scene), "mask_image": data_url(mask), "seed": 5, **SMALL}
    response = generate(client, body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["face"]["image_size"] == [1024, 1024]  # the scene's frame (reference rule on 128x128)
    out = np.asarray(fetch_image(result["images"][0]["url"]).convert("RGB"))
    keep = np.asarray(mask.resize((64, 64), Image.Resampling.NEAREST)) == 0
    framed = np.asarray(scene.resize((64, 64), Image.Resampling.BICUBIC))
    assert (out[keep] == framed[keep]).all() and (out[~keep] != framed[~keep]).any()

    job = client.post("/v1/generations", json={**body, "async": True}, headers=auth()).json()
    view = job_end(client, job["id"])
    assert view["status"] == "succeeded", view
    assert (pixels_at(view["images"][0]["url"]) == pixels_at(result["images"][0]["url"])).all()  # (the files'
    # C2PA manifests differ: each names its own generation)


@pytest.mark.parametrize("change,status,code,field", [
    ({"mask_image": "MASK"}, 422, "invalid_parameter", "mask_image"),
    ({"strength": 0.5}, 422, "invalid_parameter", "strength"),
    ({"image": "PHOTO", "strength": 1.5}, 422, "invalid_parameter", "strength"),
    ({"image": "PHOTO", "mask_image": "SMALL_MASK"}, 422, "invalid_parameter", "mask_image"),
    ({"image": "PHOTO", "mask_image": b64(b"not an image")}, 400, "invalid_image", "mask_image"),
    ({"image": data_url(Image.new("RGB", (200, 200)))}, 422, "no_face", "image"),
])
def test_bad_pictures_and_masks_are_refused_naming_the_field(client, photo, change, status, code, field):
    values = {"PHOTO": photo, "MASK": data_url(Image.new("L", (256, 256), 255)),
              "SMALL_MASK": data_url(Image.new("L", (32, 32), 255))}
    change = {k: values.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    assert_error(generate(client, {"face_images": [photo], **SMALL, **change}), status, code, field)


# ----------------------------------------------------------------------------- extra ControlNets


def test_extra_controlnets_over_http_sync_and_async(client, photo):
    """A Canny ControlNet from a photo and a ready-made pose image change the render; the
    async job (its control images kept in the job's input) makes the same bytes; the
    options list what the deployment has."""
    offered = client.get("/v1/options").json()
    assert offered["controlnets"] == ["canny", "depth", "pose"] and offered["annotators"] == ["canny", "depth", "pose"]
    scene = data_url(face_photo(size=(160, 128), blobs=((80, 60, 30), (20, 100, 10))))
    body = {"face_images": [photo], "seed": 11, **SMALL}
    plain = generate(client, body)
    assert plain.status_code == 200, plain.text
    extra = {**body, "controlnets": [{"type": "canny", "image": scene, "scale": 0.9},
                                     {"type": "pose", "image": scene, "preprocessed": True,
                                      "control_guidance_end": 0.5}]}
    controlled = generate(client, extra)
    assert controlled.status_code == 200, controlled.text
    url = controlled.json()["images"][0]["url"]
    assert (pixels_at(url) != pixels_at(plain.json()["images"][0]["url"])).any()
    job = client.post("/v1/generations", json={**extra, "async": True}, headers=auth()).json()
    view = job_end(client, job["id"])
    assert view["status"] == "succeeded", view
    assert (pixels_at(view["images"][0]["url"]) == pixels_at(url)).all()


@pytest.mark.parametrize("entry,status,code,field", [
    ({"type": "sketch", "image": "PHOTO"}, 422, "invalid_parameter", "controlnets[0].type"),
    ({"type": "pose", "image": "PHOTO", "control_guidance_start": 0.6, "control_guidance_end": 0.5}, 422,
     "invalid_parameter", "controlnets[0].control_guidance_end"),
    ({"type": "canny"}, 422, "invalid_parameter", "controlnets[0].image"),
    ({"type": "canny", "image": "PHOTO", "scale": 9}, 422, "invalid_parameter", "controlnets[0].scale"),
    ({"type": "canny", "image": b64(b"not an image")}, 400, "invalid_image", "controlnets[0].image"),
])
def test_bad_controlnet_entries_are_refused_naming_the_field(client, photo, entry, status, code, field):
    entry = {k: photo if v == "PHOTO" else v for k, v in entry.items()}
    assert_error(generate(client, {"face_images": [photo], **SMALL, "controlnets": [entry]}), status, code, field)
