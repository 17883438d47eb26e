"""Async generations through real HTTP: 202 and a durable job, polling, server-sent events,
cancellation, job records in storage, expiry, signed webhooks with retries, and jobs that
survive their runner dying and the app being redeployed."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from deployments.auth import owner_of
from deployments.runner import delivery_id
from deployments.webhooks import verify
from tests.conftest import CONSENT, DIGEST_A, KEY_A, KEY_B, data_url, face_photo
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
    # long enough (seconds) that the runner's once-a-second progress is seen at several steps
    job = client.post("/v1/generations", json={"face_images": [photo], "async": True, "seed": 4,
                                               "width": 256, "height": 256, "num_inference_steps": 40}).json()
    stream = events(client, job["id"])
    names = [name for name, _ in stream]
    assert names[-1] == "done" and set(names[:-1]) <= {"progress"}
    steps = [view["progress"]["step"] for _, view in stream if view.get("progress")]
    assert steps == sorted(steps) and len(set(steps)) >= 3 and max(steps) == 40
    stages = [view["stage"] for _, view in stream]
    assert "rendering" in stages and stages[-1] == "done"
    assert stream[-1][1]["status"] == "succeeded" and stream[-1][1]["images"]
    assert (stream[-1][1]["progress"]["step"], stream[-1][1]["progress"]["total"]) == (40, 40)  # complete when done


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


def test_bad_photos_are_refused_at_once_and_a_job_that_fails_reports_a_stable_error(client, photo):
    black = data_url(face_photo(blobs=()))
    refused = client.post("/v1/generations", json={"face_images": [black], "async": True, **SMALL})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_face"  # no job for a bad photo
    # the server's LoRA "missing" names a file that is not there: the render fails, the job says why
    job = client.post("/v1/generations", json={"face_images": [photo], "async": True, "lora": "missing", **SMALL})
    assert job.status_code == 202, job.text
    final = wait_for(client, job.json()["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "invalid_parameter" and final["error"]["field"] == "lora", final["error"]


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
    record_path = storage_dir / "jobs" / job["id"] / "record.json"
    record = json.loads(record_path.read_text())
    assert record["status"] == "succeeded" and record["owner"] == owner_of(DIGEST_A)
    assert record["expires_at"] > time.time()
    record["expires_at"] = time.time() - 1  # as if the retention period were over
    record_path.write_text(json.dumps(record))
    response = client.get(f"/v1/generations/{job['id']}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def image_bytes(view: dict) -> list[bytes]:
    return [httpx.get(image["url"], timeout=60).content for image in view["images"]]


def assert_same_images(view: dict, other: dict, within: int = 0) -> None:
    """The same images: byte for byte, or with no pixel more than ``within`` levels apart
    (what a batched render promises against a lone one)."""
    import io

    import numpy as np
    from PIL import Image

    ours, theirs = image_bytes(view), image_bytes(other)
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    if ours != theirs:
        diffs = [int(np.abs(np.asarray(Image.open(io.BytesIO(a)), int) - np.asarray(Image.open(io.BytesIO(b)), int))
                     .max()) for a, b in zip(ours, theirs)]
        if max(diffs) > within:
            raise AssertionError(f"images differ (largest pixel difference per image: {diffs})")


def renders(storage_dir, generation_id: str) -> list:
    return list((storage_dir / "generations" / generation_id / "renders").iterdir())


def runner_holding(storage_dir, generation_id: str) -> str | None:
    """The actor name of the JobRunner replica that holds the job's lease."""
    lease = json.loads((storage_dir / "jobs" / "active" / f"{generation_id}.json").read_text())
    return lease["holder"].rsplit("/", 1)[0] if lease["holder"] else None


def started(client, generation_id: str, step: int = 1) -> None:
    deadline = time.monotonic() + 240
    while (client.get(f"/v1/generations/{generation_id}").json().get("progress") or {}).get("step", 0) < step:
        assert time.monotonic() < deadline, "the job did not start rendering"
        time.sleep(0.2)


MEDIUM = {"width": 192, "height": 192, "num_inference_steps": 40}


@pytest.fixture(scope="module")
def face_id(client, photo) -> str:
    """A registered face: jobs and their undisturbed twins render the same stored analysis
    (a photo analysed in another batch of the face stage may differ in its last float bits)."""
    response = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]})
    assert response.status_code == 201, response.text
    return response.json()["face_id"]


def test_a_job_whose_runner_is_killed_mid_render_is_taken_over_and_ends_as_if_undisturbed(client, face_id,
                                                                                          storage_dir):
    import ray

    job = client.post("/v1/generations", json={"face_id": face_id, "async": True, "seed": 21, **MEDIUM}).json()
    started(client, job["id"], step=2)
    holder = runner_holding(storage_dir, job["id"])
    ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)
    final = wait_for(client, job["id"], timeout=300)
    assert final["status"] == "succeeded", final
    record = json.loads((storage_dir / "jobs" / job["id"] / "record.json").read_text())
    assert record["attempts"] >= 2  # another runner took it over
    assert len(renders(storage_dir, job["id"])) == 1  # stored once
    undisturbed = client.post("/v1/generations", json={"face_id": face_id, "seed": 21, **MEDIUM})
    assert undisturbed.status_code == 200, undisturbed.text
    # the same images; within 1/255, not byte for byte: the killed runner's call can stay in
    # the Generator's step loop until it ends, and the taken-over render then shares its
    # forwards (a batched image agrees with a lone one within 1/255: test_serving checks it)
    assert_same_images(final, undisturbed.json(), within=1)


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
    # a 500 first, then accepted: nothing more from that runner. (A runner that took the job
    # over while it was being delivered delivers once more: at least once, under the same id.)
    assert 2 <= len(receiver.requests) <= 3
    assert {r["headers"]["X-InstantID-Delivery"] for r in receiver.requests} == {
        delivery_id(job["id"], "generation.succeeded")}
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


def test_jobs_running_through_a_redeploy_with_a_changed_config_all_succeed_as_if_undisturbed(
        client, face_id, storage_dir, local_app):
    """Over 60 s: a redeploy starts new replicas (and drains the old ones) while four renders
    run. Every replica of the JobRunner and the Generator is replaced (a changed config) while
    one job renders and another waits: each ends succeeded, its images those an undisturbed
    render makes, stored once. The two have different sizes, so neither shares a batch with
    the other; a handed-over render can still share step-loop forwards with its own first
    attempt when both reach the same Generator replica, so images agree within 1/255 (a
    batched render's promise: test_serving checks it), not always bit for bit. (Last in this
    module: the app stays redeployed, unchanged otherwise, for the modules after it.)"""
    import threading

    from ray import serve

    from deployments.app import build_app

    bodies = [{"face_id": face_id, "async": True, "seed": 40 + k, **MEDIUM, "width": width}
              for k, width in enumerate((192, 176))]
    jobs = [client.post("/v1/generations", json=body).json() for body in bodies]
    started(client, jobs[0]["id"], step=2)
    options = {name: {**entry} for name, entry in local_app["options"].items()}
    for name in ("JobRunner", "Generator"):  # new replicas for these two
        options[name]["ray_actor_options"] = {**options[name].get("ray_actor_options", {}), "num_cpus": 0.4}
    redeploy = threading.Thread(target=serve.run, args=(build_app(local_app["args"], options),),
                                kwargs={"name": "local", "route_prefix": "/local"})
    redeploy.start()
    finals = [wait_for(client, job["id"], timeout=600) for job in jobs]
    redeploy.join(timeout=600)
    assert [f["status"] for f in finals] == ["succeeded"] * 2, [f["error"] for f in finals]
    attempts = [json.loads((storage_dir / "jobs" / j["id"] / "record.json").read_text())["attempts"] for j in jobs]
    assert max(attempts) >= 2, attempts  # at least the rendering one was handed over
    for body, final in zip(bodies, finals):
        assert len(renders(storage_dir, final["id"])) == 1
        undisturbed = client.post("/v1/generations", json={k: v for k, v in body.items() if k != "async"})
        assert_same_images(final, undisturbed.json(), within=1)
