"""Faults under real HTTP: the object store going away and coming back, a Generator replica
killed mid-batch, clients that hang up, and a bounded soak of mixed load."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import CONSENT, KEY_A, data_url, face_photo
from tests.test_cluster import wait_until

HEADERS = {"Authorization": f"Bearer {KEY_A}"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
BUCKET = "hardening"
STATS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts" / "reliability-faults.json"
SOAK_SECONDS = 25
SOAK_REQUESTS = 60  # the soak goes on past SOAK_SECONDS until this many were answered
figures: dict = {}


@pytest.fixture(scope="module")
def faults_url(s3_app):
    yield s3_app["url"]
    STATS.parent.mkdir(parents=True, exist_ok=True)
    STATS.write_text(json.dumps(figures, indent=1))


@pytest.fixture(scope="module")
def photo():
    return data_url(face_photo())


def records_and_images(s3_server) -> tuple[list[dict], set[str]]:
    s3 = s3_server.client()
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="svc/generations/").get("Contents", [])]
    records = [json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys
               if k.endswith("record.json")]
    return records, {k.removeprefix("svc/") for k in keys}


def test_object_store_down_is_a_clean_503_and_the_service_recovers_without_restart(faults_url, photo, s3_server):
    with httpx.Client(base_url=faults_url, timeout=120, headers=HEADERS) as c:
        assert c.post("/v1/generations", json={"face_images": [photo], **SMALL}).status_code == 200
        s3_server.stop()
        try:
            down = [c.post("/v1/generations", json={"face_images": [photo], **SMALL}) for _ in range(2)]
            face = c.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]})
        finally:
            s3_server.restart()
        endpoint = s3_server.endpoint.removeprefix("http://")
        for response in (*down, face):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "storage_unavailable"
            assert endpoint not in response.text and "http" not in response.json()["error"]["message"]
        back = wait_until(lambda: c.post("/v1/generations", json={"face_images": [photo], **SMALL}), 60,
                          "a generation after the store came back", interval=1)
        assert back.status_code == 200, back.text
        assert httpx.get(back.json()["images"][0]["url"], timeout=30).status_code == 200
    records, keys = records_and_images(s3_server)
    for record in records:  # no record points at an image that was never written
        assert set(record["keys"]) <= keys, record
    figures["store_outages"] = 1
    figures["requests_during_outage"] = len(down) + 1


def test_a_generator_killed_mid_batch_fails_its_requests_cleanly_or_retries_them(faults_url, photo):
    import ray

    from tests.test_hardening import replica_pids

    body = {"face_images": [photo], "width": 128, "height": 128, "num_inference_steps": 30}
    results: list = []

    async def batch():
        async with httpx.AsyncClient(base_url=faults_url, timeout=180, headers=HEADERS) as c:
            return await asyncio.gather(*(c.post("/v1/generations", json={**body, "seed": i}) for i in range(4)))

    thread = threading.Thread(target=lambda: results.extend(asyncio.run(batch())))
    started = time.monotonic()
    thread.start()
    handle_name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if "s3app#Generator" in a["name"])
    from ray import serve

    generator = serve.get_deployment_handle("Generator", app_name="s3app")
    wait_until(lambda: generator.status.remote().result(timeout_s=10)["rendering"] > 0, 120, "a batch rendering")
    ray.kill(ray.get_actor(handle_name, namespace="serve"), no_restart=True)
    thread.join(timeout=300)
    assert not thread.is_alive(), "requests hung after the replica died"
    codes = Counter(r.status_code for r in results)
    assert len(results) == 4 and set(codes) <= {200, 503}, codes  # retried on a new replica, or a clean 503
    for response in results:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "unavailable" and response.headers["retry-after"]
    assert replica_pids("Generator", app="s3app")  # replaced
    figures["replicas_killed_mid_batch"] = 1
    figures["requests_in_killed_batch"] = dict(codes)
    figures["kill_to_answer_s"] = round(time.monotonic() - started, 1)


def test_a_client_that_hangs_up_does_not_leave_the_replica_busy(faults_url, photo, s3_server):
    from ray import serve

    generator = serve.get_deployment_handle("Generator", app_name="s3app")
    wait_until(lambda: generator.status.remote().result(timeout_s=10)["rendering"] == 0, 120, "an idle generator")
    before, _ = records_and_images(s3_server)
    slow = {"face_images": [photo], "width": 512, "height": 512, "num_inference_steps": 150}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{faults_url}/v1/generations", json=slow, headers=HEADERS, timeout=8)
    # the abandoned render stops at its next step: the replica is idle long before 150 steps
    wait_until(lambda: generator.status.remote().result(timeout_s=10)["rendering"] == 0, 120,
               "the replica to drop the abandoned render")
    time.sleep(2)
    after, _ = records_and_images(s3_server)
    assert len(after) == len(before)  # it was never finished and stored
    figures["client_disconnects"] = 1


def test_soak_mixed_load_with_flat_memory_and_no_5xx(faults_url, photo):
    """A bounded soak: sync and async generations, face registrations, reads, deletes and
    bad requests from 4 clients for SOAK_SECONDS; every replica's memory stays within bounds."""
    from tests.test_hardening import replica_rss

    deployments = ("Ingress", "FaceEmbedder", "Generator", "Postprocessor")
    with httpx.Client(base_url=faults_url, timeout=120, headers=HEADERS) as c:  # warm every path once
        face_id = c.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]}).json()["face_id"]
        c.post("/v1/generations", json={"face_id": face_id, **SMALL})
    baseline = {name: replica_rss(name, app="s3app") for name in deployments}
    outcomes: Counter = Counter()
    counted = threading.Lock()
    stop = time.monotonic() + SOAK_SECONDS
    last_chance = stop + 300  # a slow machine soaks longer, until it has sent SOAK_REQUESTS

    def going() -> bool:
        now = time.monotonic()
        with counted:
            total = sum(outcomes.values())
        return now < stop or (total < SOAK_REQUESTS and now < last_chance)

    def actions(c: httpx.Client, rng: random.Random):
        choice = rng.random()
        if choice < 0.3:
            return c.post("/v1/generations", json={"face_id": face_id, "seed": rng.randrange(2**62), **SMALL})
        if choice < 0.45:
            job = c.post("/v1/generations", json={"face_images": [photo], **SMALL},
                         headers={"Prefer": "respond-async"}).json()
            return c.get(f"/v1/generations/{job['id']}")
        if choice < 0.6:
            new = c.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]})
            c.get(f"/v1/faces/{new.json()['face_id']}")
            return c.delete(f"/v1/faces/{new.json()['face_id']}")
        if choice < 0.75:
            return c.post("/v1/generations", json={"face_images": ["not an image"], **SMALL})
        if choice < 0.85:
            return c.post("/v1/generations", json={"face_id": face_id, "width": 100})
        if choice < 0.95:
            return c.get("/v1/faces/f_" + "q" * 22)
        return c.get("/healthz")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=faults_url, timeout=120, headers=HEADERS) as c:
            while going():
                try:
                    outcome = actions(c, rng).status_code
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                with counted:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SOAK_SECONDS + 300 + 180)
    soaked_s = time.monotonic() - stop + SOAK_SECONDS
    growth = {name: replica_rss(name, app="s3app") - baseline[name] for name in deployments}
    figures["soak"] = {"seconds": round(soaked_s), "requests": sum(outcomes.values()),
                       "statuses": {str(k): v for k, v in outcomes.items()},
                       "rss_growth_mib": {k: round(v / 2**20, 1) for k, v in growth.items()}}
    assert sum(outcomes.values()) >= SOAK_REQUESTS, outcomes  # fewer only if the app stalled for minutes
    assert not [k for k in outcomes if not isinstance(k, int) or k >= 500], outcomes  # zero 5xx, no transport errors
    assert outcomes[200] + outcomes[201] + outcomes[202] + outcomes[204] > 0 and outcomes[422] and outcomes[400]
    for name, grown in growth.items():
        assert grown < 200 * 2**20, f"{name} grew {grown / 2**20:.0f} MiB during the soak"
