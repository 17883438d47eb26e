"""A Generator autoscaled to zero replicas, over real Ray and HTTP: the app is healthy at
zero, a request sent then waits while a replica starts (an async job says ``starting``)
and gets its image, and the replica goes again once idle."""

from __future__ import annotations

import time

import httpx
import pytest

from bench.coldstart import ZERO_COLUMNS, generator_state, run_scale_from_zero, scale_to_zero, wait_for_state
from deployments.health import state_of
from tests.conftest import DIGEST_A, KEY_A, data_url, face_photo, local_test_options
from tests.test_bench import rows

HEADERS = {"Authorization": f"Bearer {KEY_A}"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 1}


@pytest.mark.parametrize(("status", "replicas", "state"), [
    ("HEALTHY", {"RUNNING": 2}, "running"),
    ("UPSCALING", {"RUNNING": 1, "STARTING": 1}, "running"),
    ("HEALTHY", {}, "scaled_to_zero"),
    ("HEALTHY", {"RUNNING": 0, "STARTING": 0}, "scaled_to_zero"),
    ("UPSCALING", {"STARTING": 1}, "starting"),
    ("UPDATING", {"STARTING": 1}, "unavailable"),  # being deployed
    ("UNHEALTHY", {"STARTING": 1}, "unavailable"),  # a lost replica being replaced
    ("HEALTHY", {"STARTING": 1}, "unavailable"),  # target not met: not a stage at zero
    ("DOWNSCALING", {"STOPPING": 1}, "unavailable"),
])
def test_a_stage_without_a_running_replica_is_healthy_only_when_scaled_to_zero(status, replicas, state):
    assert state_of(status, replicas) == state


@pytest.fixture(scope="module")
def zero_url(ray_serve, weights_dir, tmp_path_factory):
    """An app whose Generator scales to zero. Over 60 s beside the suite's other process
    (15-25 s alone): a whole app's replicas start at once."""
    from ray import serve

    from deployments.app import build_app

    args = {"weights": str(weights_dir), "storage": str(tmp_path_factory.mktemp("zero-storage")),
            "auth": {"api_key_sha256": [DIGEST_A], "api_keys_env": ""}, "request_timeout_s": 900,
            "job_lease_s": 10}
    options = scale_to_zero(local_test_options(graceful_shutdown_timeout_s=5))
    serve.run(build_app(args, options), name="zero", route_prefix="/zero")
    yield f"{ray_serve}/zero"
    serve.delete("zero", _blocking=False)


def test_a_generator_scaled_to_zero_starts_for_a_request_and_goes_again_when_idle(zero_url, tmp_path):
    """Over 60 s: a Generator replica starts twice (a fresh worker process imports torch and
    loads the fixture weights each time), and goes once after idling (Serve's replicas
    report their load every 10 s, so that takes 10-25 s)."""
    with httpx.Client(base_url=zero_url, timeout=900, headers=HEADERS) as client:
        health = client.get("/healthz")
        assert health.status_code == 200, health.text  # nothing is wrong with a stage at zero
        generator = {s["stage"]: s for s in health.json()["stages"]}["generator"]
        assert generator["state"] == "scaled_to_zero" and not generator["replicas"].get("RUNNING")

        # an async job sent at zero: its status says a replica is starting, then it renders
        photo = data_url(face_photo())
        job = client.post("/v1/generations", json={"face_images": [photo], "seed": 1, **SMALL},
                          headers={"Prefer": "respond-async"})
        assert job.status_code == 202, job.text
        # each stage with when it was first seen, and the longest poll (both said on failure)
        stages, seen, longest_poll, sent = [], [], 0.0, time.monotonic()
        while True:
            asked = time.monotonic()
            view = client.get(f"/v1/generations/{job.json()['id']}").json()
            longest_poll = max(longest_poll, time.monotonic() - asked)
            if not stages or stages[-1] != view["stage"]:
                stages.append(view["stage"])
                seen.append((view["stage"], round(time.monotonic() - sent, 2)))
            if view["status"] in ("succeeded", "failed", "canceled"):
                break
            assert time.monotonic() < sent + 600, seen
            time.sleep(0.1)
        assert view["status"] == "succeeded", view
        # a replica starts in seconds (a new process importing torch): the record shows it for many polls
        assert "starting" in stages and stages[-1] == "done", (seen, f"longest poll {longest_poll:.2f} s",
                                                               view["timings_ms"])
        assert stages.index("starting") < max(i for i, s in enumerate(stages) if s in ("rendering", "storing", "done"))
        assert view["timings_ms"]["starting"] > 0  # how long the job waited for the replica
        assert client.get(view["images"][0]["url"]).status_code == 200
        assert generator_state(client) == "running"

        # idle: the replica goes; the benchmark's cycle then sends a request at zero and one warm
        wait_for_state(client, "scaled_to_zero", timeout_s=600)
    table = run_scale_from_zero(zero_url, tmp_path, headers=HEADERS, width=64, height=64, steps=1, cycles=1)
    [row] = rows(tmp_path / "scale_from_zero.csv", ZERO_COLUMNS, required=ZERO_COLUMNS)
    assert row["status"] == "ok" and row["cycles"] == "1"
    assert float(row["replica_start_median_s"]) > 0 and float(row["warm_median_s"]) > 0
    assert float(row["zero_to_image_median_s"]) >= float(row["replica_start_median_s"])
    assert "Scale from zero" in table.markdown()
