"""The production application on a multi-node Ray cluster on this machine.

Four Ray nodes on loopback advertise what a real cluster's nodes do: a CPU head, a
small-GPU (L4) node and two large-GPU (H100) nodes. The production serve_config.yaml is
deployed on fixture weights (the models run on the CPU: the GPUs are only advertised).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest

from deployments.app import build_app
from deployments.auth import new_key
from deployments.local import application_config, deployment_options, load_serve_config, local_args
from tests.conftest import CONSENT, data_url, face_photo, loopback_cluster
from tests.s3server import free_ports

pytestmark = pytest.mark.own_ray  # a Ray of its own: it runs in the suite's other process (conftest.py)

KEY, DIGEST = new_key()
HEADERS = {"Authorization": f"Bearer {KEY}"}
MB = 1024 * 1024
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(weights_dir, s3_server, ray_runtime):
    """Over 60 s to set up: four raylets (a head and three nodes with different accelerators)
    on this one machine, then the whole app with two face replicas; the tests of this module
    share it."""
    import ray
    from ray import serve

    from deployments.ray_setup import runtime_env, stop_ray_now

    ray_runtime.stop()  # one Ray per process: the session's single-node one makes way
    s3_server.client().create_bucket(Bucket="cluster")
    with loopback_cluster(s3_server, num_cpus=4, num_gpus=0, object_store_memory=100 * MB) as cluster:
        nodes = {
            "small": cluster.add_node(num_cpus=4, num_gpus=1, resources={"accelerator_type:L4": 1},
                                      object_store_memory=100 * MB),
            "large1": cluster.add_node(num_cpus=8, num_gpus=1, resources={"accelerator_type:H100": 1},
                                       object_store_memory=100 * MB),
            "large2": cluster.add_node(num_cpus=8, num_gpus=1, resources={"accelerator_type:H100": 1},
                                       object_store_memory=100 * MB),
        }
        ray.init(address=cluster.address, runtime_env=runtime_env(), log_to_driver=False)
        port = free_ports(1)[0]
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})

        application = application_config(load_serve_config())
        options = deployment_options(application, gpus=True, max_replicas=None)  # production resources
        fast = {"metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 6}
        options["Generator"]["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=2,
                                                          target_ongoing_requests=1, **fast)
        options["Generator"]["graceful_shutdown_timeout_s"] = 5
        args = local_args(application, weights=str(weights_dir), storage="s3://cluster/outputs",
                          s3_endpoint_url=s3_server.endpoint, auth={"api_key_sha256": [DIGEST], "api_keys_env": ""},
                          request_timeout_s=900)  # minutes: a replacement replica may start slowly on a busy machine
        serve.run(build_app(args, options), name=application["name"], route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "cluster": cluster, "nodes": nodes, "s3": s3_server}
        stop_ray_now()  # no drain: the replicas end with the cluster


def replicas(deployment: str) -> list[dict]:
    """Live replicas of a deployment with the node they run on."""
    import ray
    from ray._private.state import actors

    accelerators = {}
    for node in ray.nodes():
        kinds = [k.split(":", 1)[1] for k in node["Resources"] if k.startswith("accelerator_type:")]
        accelerators[node["NodeID"]] = kinds[0] if kinds else "cpu"
    return [
        {"name": info["Name"], "node": info["Address"]["NodeID"], "accelerator": accelerators.get(
            info["Address"]["NodeID"], "gone")}
        for info in actors().values()
        if info["State"] == "ALIVE" and info["ActorClassName"].endswith(f":instantid:{deployment}")
    ]


class Load:
    """Keeps ``concurrency`` requests in flight until stopped; records every outcome."""

    def __init__(self, url: str, concurrency: int, body: dict) -> None:
        self.url, self.concurrency, self.body = url, concurrency, body
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=HEADERS, timeout=1000) as client:
            async def worker(index: int) -> None:
                seed = index * 1000
                while not self._stop.is_set():
                    seed += 1
                    try:
                        response = await client.post("/v1/generations", json={**self.body, "seed": seed})
                        self.results.append((time.monotonic(), response.status_code))
                    except httpx.HTTPError:
                        self.results.append((time.monotonic(), 0))

            await asyncio.gather(*(worker(i) for i in range(self.concurrency)))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1000)

    def ok_since(self, since: float) -> int:
        return sum(1 for at, code in self.results if at > since and code == 200)


@pytest.fixture(scope="module")
def face_id(cluster):
    response = httpx.post(f"{cluster['url']}/v1/faces",
                          json={"consent": CONSENT, "face_images": [data_url(face_photo())]}, headers=HEADERS,
                          timeout=120)
    assert response.status_code == 201, response.text
    return response.json()["face_id"]


def test_replicas_land_only_on_nodes_with_their_accelerator(cluster):
    faces, generators = replicas("FaceEmbedder"), replicas("Generator")
    assert len(faces) == 2 and {r["accelerator"] for r in faces} == {"L4"}  # 2 x 0.25 GPU on the L4 node
    assert len(generators) == 1 and {r["accelerator"] for r in generators} == {"H100"}
    assert httpx.get(f"{cluster['url']}/healthz", timeout=60).status_code == 200


def test_generator_scales_up_under_load_and_down_after(cluster, face_id):
    with Load(cluster["url"], concurrency=6, body={"face_id": face_id, **SMALL}) as load:
        # the two replicas as they were when the second came (the scale-down may follow the load soon)
        scaled = wait_until(lambda: found if len(found := replicas("Generator")) == 2 else None, 300,
                            "a second Generator replica")
        scaled_at = time.monotonic()
        wait_until(lambda: load.ok_since(scaled_at) >= 6, 300, "requests served after the scale-up")
    assert {r["accelerator"] for r in scaled} == {"H100"}
    assert {r["node"] for r in scaled} == {cluster["nodes"]["large1"].node_id, cluster["nodes"]["large2"].node_id}
    codes = Counter(code for _, code in load.results)
    assert codes[200] > 0 and set(codes) <= {200, 503}, codes
    wait_until(lambda: len(replicas("Generator")) == 1, 300, "the scale-down after the load stopped")


def render_count(s3, generation_id: str) -> int:
    listed = s3.client().list_objects_v2(Bucket="cluster", Prefix=f"outputs/generations/{generation_id}/renders/")
    return listed.get("KeyCount", 0)


def test_generator_replicas_killed_mid_render_are_replaced_under_load_and_a_retry_renders_once(cluster, face_id):
    """40-75 s on a quiet machine (over 60 s beside the suite's other process), up to two
    minutes on a busy one: one replica replacement, shared by both checks. While other
    clients keep sending, every Generator replica is killed while a keyed render (40 steps at
    256) is on one of them; a replacement starts and serves the load, and the retry with the
    same Idempotency-Key is rendered once."""
    import ray

    body = {"face_id": face_id, "width": 256, "height": 256, "num_inference_steps": 40, "seed": 77}
    headers = {**HEADERS, "Idempotency-Key": "upload-7f3a"}
    outcome: dict = {}

    def first_attempt():
        outcome["first"] = httpx.post(f"{cluster['url']}/v1/generations", json=body, headers=headers, timeout=1000)

    with Load(cluster["url"], concurrency=2, body={"face_id": face_id, **SMALL}) as load:
        wait_until(lambda: load.ok_since(0) >= 3, 300, "traffic")
        thread = threading.Thread(target=first_attempt)
        thread.start()
        s3 = cluster["s3"].client()
        # only a keyed request writes a claim: this one
        claimed = lambda: s3.list_objects_v2(Bucket="cluster", Prefix="outputs/generations/").get("Contents", [])  # noqa
        wait_until(lambda: any(o["Key"].endswith("claim.json") for o in claimed()), 300, "the render to start")
        time.sleep(1.0)
        before = {r["name"] for r in replicas("Generator")}
        for name in before:  # the replica rendering it dies mid-render, and any other with it
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        # a replica that did not exist before the kill (the load keeps the target at least 1)
        wait_until(lambda: {r["name"] for r in replicas("Generator")} - before, 300, "a replacement replica")
        assert not before & {r["name"] for r in replicas("Generator")}
        wait_until(lambda: load.ok_since(killed_at) >= 5, 300, "requests served after the kill")
        thread.join(timeout=1000)
    codes = Counter(code for _, code in load.results)
    assert set(codes) <= {200, 500, 503}, codes  # requests in flight on the dead replica may fail
    assert codes[200] >= 8

    retry = httpx.post(f"{cluster['url']}/v1/generations", json=body, headers=headers, timeout=1000)
    assert retry.status_code == 200, retry.text
    first = outcome["first"]
    if first.status_code == 200:  # the ingress retried on a new replica itself
        assert first.json()["id"] == retry.json()["id"]
        assert retry.headers.get("idempotent-replayed") == "true"
    else:  # the client saw the failure: its retry rendered it
        assert first.status_code in (500, 503), first.text
    assert render_count(cluster["s3"], retry.json()["id"]) == 1
    again = httpx.post(f"{cluster['url']}/v1/generations", json=body, headers=headers, timeout=1000)
    assert again.json()["id"] == retry.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    assert render_count(cluster["s3"], retry.json()["id"]) == 1


def test_losing_a_node_under_load_recovers(cluster, face_id):
    host = replicas("Generator")[0]["node"]
    node = next(n for n in cluster["nodes"].values() if n.node_id == host)
    with Load(cluster["url"], concurrency=3, body={"face_id": face_id, **SMALL}) as load:
        wait_until(lambda: load.ok_since(0) >= 2, 300, "traffic")
        cluster["cluster"].remove_node(node, allow_graceful=False)
        lost_at = time.monotonic()
        wait_until(lambda: [r for r in replicas("Generator") if r["node"] != host], 300,
                   "a Generator replica on the remaining H100 node")
        wait_until(lambda: load.ok_since(lost_at) >= 5, 300, "requests served after the node was lost")
    assert {r["accelerator"] for r in replicas("Generator")} == {"H100"}
    # replicas of other stages that the lost node held come back too (healthz names a stage
    # without a running replica until its replacement is up): waited for, not raced
    wait_until(lambda: httpx.get(f"{cluster['url']}/healthz", timeout=60).status_code == 200, 300,
               "every stage running again (/healthz 200)")
