"""Async generations through real HTTP: 202 and a job, polling, server-sent events,
cancellation, job records in storage, expiry, and signed webhooks with retries."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from deployments.auth import owner_of
from deployments.webhooks import verify
from tests.conftest import DIGEST_A, KEY_A, KEY_B, data_url, face_photo
from tests.test_webhooks import Receiver

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4}
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def storage_dir(local_app):
    return local_app["storage"]


@pytest.fixture(scope="module")
def jobs_url(local_app):
    return local_app["url"]


@pytest.fixture(scope="module")
def client(jobs_url):
    with httpx.Client(base_url=jobs_url, timeout=120, headers={"Authorization": f"Bearer {KEY_A}"}) as c:
        yield c


@pytest.fixture(scope="module")
def photo():
    return data_url(face_photo())


def wait_for(client, generation_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/generations/{generation_id}").json()
        if view["status"] in TERMINAL:
            return view
        time.sleep(0.2)
    raise AssertionError(f"{generation_id} did not finish")


def events(client, generation_id: str) -> list[tuple[str, dict]]:
    out = []
    with client.stream("GET", f"/v1/generations/{generation_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((name, json.loads(line.split(":", 1)[1])))
    return out


def test_prefer_respond_async_answers_202_then_the_job_succeeds(client, photo):
    response = client.post("/v1/generations", json={"face_images": [photo], "seed": 3, **SMALL},
                           headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and job["images"] == []
    assert response.headers["location"] == f"/v1/generations/{job['id']}"
    final = wait_for(client, job["id"])
    assert final["status"] == "succeeded" and final["error"] is None
    assert [image["seed"] for image in final["images"]] == [3]
    assert httpx.get(final["images"][0]["url"], timeout=30).status_code == 200
    assert final["face"]["bbox"] and final["batch_size"] == 1


def test_events_stream_progress_step_by_step_then_done(client, photo):
    job = client.post("/v1/generations", json={"face_images": [photo], "async": True, "seed": 4,
                                               "width": 64, "height": 64, "num_inference_steps": 12}).json()
    stream = events(client, job["id"])
    names = [name for name, _ in stream]
    assert names[-1] == "done" and set(names[:-1]) <= {"progress"}
    steps = [view["progress"]["step"] for _, view in stream if view.get("progress")]
    assert steps == sorted(steps) and len(set(steps)) >= 3 and max(steps) == 12
    stages = [view["stage"] for _, view in stream]
    assert "rendering" in stages and stages[-1] == "done"
    assert stream[-1][1]["status"] == "succeeded" and stream[-1][1]["images"]


def test_cancel_stops_a_running_job_between_steps(client, photo):
    slow = {"face_images": [photo], "async": True, "width": 512, "height": 512, "num_inference_steps": 150}
    job = client.post("/v1/generations", json=slow).json()
    deadline = time.monotonic() + 120
    while (client.get(f"/v1/generations/{job['id']}").json().get("progress") or {}).get("step", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    response = client.post(f"/v1/generations/{job['id']}/cancel")
    assert response.status_code == 202
    final = wait_for(client, job["id"])
    assert final["status"] == "canceled" and final["error"]["code"] == "canceled", final["error"]
    assert final["progress"]["step"] < 150
    again = client.post(f"/v1/generations/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_cancellable"
    # the replica is free again: a short job goes through
    quick = client.post("/v1/generations", json={"face_images": [photo], "async": True, **SMALL}).json()
    assert wait_for(client, quick["id"])["status"] == "succeeded"


def test_a_job_that_fails_reports_a_stable_error(client):
    black = data_url(face_photo(blobs=()))
    job = client.post("/v1/generations", json={"face_images": [black], "async": True, **SMALL}).json()
    final = wait_for(client, job["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "no_face" and final["error"]["field"] == "face_images[0]"


def test_jobs_belong_to_their_key(client, jobs_url, photo):
    job = client.post("/v1/generations", json={"face_images": [photo], "async": True, **SMALL}).json()
    other = {"Authorization": f"Bearer {KEY_B}"}
    with httpx.Client(base_url=jobs_url, timeout=60, headers=other) as b:
        for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("DELETE", "")):
            response = b.request(method, f"/v1/generations/{job['id']}{path}")
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", path
    wait_for(client, job["id"])


def test_job_records_live_in_storage_and_expire(client, photo, storage_dir):
    job = client.post("/v1/generations", json={"face_images": [photo], "async": True, **SMALL}).json()
    wait_for(client, job["id"])
    record_path = storage_dir / "jobs" / f"{job['id']}.json"
    record = json.loads(record_path.read_text())
    assert record["status"] == "succeeded" and record["owner"] == owner_of(DIGEST_A)
    assert record["expires_at"] > time.time()
    record["expires_at"] = time.time() - 1  # as if the retention period were over
    record_path.write_text(json.dumps(record))
    response = client.get(f"/v1/generations/{job['id']}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def healthy(url: str) -> bool:
    """200 from /healthz; while Serve replaces a killed ingress the proxy may hold the request
    past the timeout or drop it, which only means: not yet."""
    try:
        return httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def test_a_job_whose_replica_died_is_reported_lost_and_finished_ones_survive(client, jobs_url, photo):
    import ray

    from tests.test_cluster import wait_until

    done = client.post("/v1/generations", json={"face_images": [photo], "async": True, **SMALL}).json()
    assert wait_for(client, done["id"])["status"] == "succeeded"
    slow = client.post("/v1/generations", json={"face_images": [photo], "async": True, "width": 512, "height": 512,
                                                "num_inference_steps": 150}).json()
    for name in ray.util.list_named_actors(all_namespaces=True):
        if "local#Ingress" in name["name"]:
            ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
    wait_until(lambda: healthy(jobs_url), 120, "a new ingress")
    lost = wait_for(client, slow["id"], timeout=60)
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost"
    again = client.get(f"/v1/generations/{done['id']}").json()  # served by the new replica, from storage
    assert again["status"] == "succeeded" and again["images"]


def test_webhook_gets_one_signed_post_after_retries(client, photo):
    receiver = Receiver(failures=1)
    try:
        job = client.post("/v1/generations", json={"face_images": [photo], "webhook_url": receiver.url, "seed": 8,
                                                   **SMALL}).json()
        final = wait_for(client, job["id"])
        deadline = time.monotonic() + 60
        while len(receiver.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # retries come 0.1 s apart here: room for a third POST, which must not come
    finally:
        receiver.close()
    assert len(receiver.requests) == 2  # a 500 first, then accepted: nothing more
    secret = client.get("/v1/webhooks/secret").json()["secret"]
    delivered = receiver.requests[-1]
    assert verify(secret, delivered["body"], delivered["headers"]["X-InstantID-Signature"])
    assert delivered["headers"]["X-InstantID-Event"] == "generation.succeeded"
    payload = json.loads(delivered["body"])
    assert payload["id"] == job["id"] and payload["status"] == "succeeded" and payload["images"][0]["seed"] == 8
    assert final["status"] == "succeeded"


def test_webhook_targets_off_the_allowlist_are_refused(client, photo):
    for url in ("http://10.1.2.3/hook", "https://example.org/hook", "not a url"):
        response = client.post("/v1/generations", json={"face_images": [photo], "webhook_url": url, **SMALL})
        assert response.status_code == 422 and response.json()["error"]["field"] == "webhook_url", url


def test_idempotent_async_submissions_are_one_job(client, photo, storage_dir):
    headers = {"Prefer": "respond-async", "Idempotency-Key": "async-1"}
    first = client.post("/v1/generations", json={"face_images": [photo], **SMALL}, headers=headers)
    second = client.post("/v1/generations", json={"face_images": [photo], **SMALL}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    changed = client.post("/v1/generations", json={"face_images": [photo], **SMALL, "seed": 5}, headers=headers)
    assert changed.status_code == 422 and changed.json()["error"]["field"] == "Idempotency-Key"
    # a synchronous retry of the same request waits for the job's result instead of rendering again
    retry = client.post("/v1/generations", json={"face_images": [photo], **SMALL},
                        headers={"Idempotency-Key": "async-1"})
    assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"], retry.text
    assert wait_for(client, first.json()["id"])["status"] == "succeeded"
    renders = storage_dir / "generations" / first.json()["id"] / "renders"
    assert len(list(renders.iterdir())) == 1
