"""The HTTP API fuzzed from the OpenAPI schema it serves (schemathesis), against the real app
on loopback: no 5xx, every response as the schema says, every error with a stable code."""

from __future__ import annotations

import json
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis import checks

from deployments.app import build_app
from deployments.auth import new_key
from deployments.problems import STATUS
from deployments.local import application_config, deployment_options, load_serve_config

KEY, DIGEST = new_key()
STATS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts" / "reliability-fuzz.json"
STABLE_CODES = set(STATUS) | {"http_error"}


@pytest.fixture(scope="module")
def fuzz_url(ray_serve, flagging_weights_dir, tmp_path_factory):
    """An app of its own (its safety checker flags every picture; tiny limits). Over 60 s
    beside the suite's other process (15-25 s alone): a whole app's replicas start at once."""
    from ray import serve

    options = deployment_options(application_config(load_serve_config()), gpus=False, max_replicas=1, cpu_cap=0.5)
    # its safety checker flags every output, and blocks it: the answers without a picture are fuzzed too
    args = {"weights": str(flagging_weights_dir), "storage": str(tmp_path_factory.mktemp("fuzz-storage")),
            "auth": {"api_key_sha256": [DIGEST], "api_keys_env": ""}, "request_timeout_s": 60,
            # valid requests stay cheap on this CPU: tiny sizes, few steps, one image
            "limits": {"max_side": 96, "max_steps": 2, "max_num_images": 1, "max_body_bytes": 262144}}
    serve.run(build_app(args, options), name="fuzz", route_prefix="/fuzz")
    yield f"{ray_serve}/fuzz"
    serve.delete("fuzz", _blocking=False)  # its replicas leave the shared cluster to later modules


@schemathesis.check
def stable_error_codes(ctx, response, case):
    if response.status_code >= 400:
        code = response.json()["error"]["code"]
        if code not in STABLE_CODES:
            raise AssertionError(f"unstable error code {code!r}")


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, stable_error_codes]


def test_api_from_its_own_schema(fuzz_url):
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    calls = {}
    for operation in operations:
        seen = []

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def fuzz(case):
            response = case.call_and_validate(base_url=fuzz_url, headers={"Authorization": f"Bearer {KEY}"},
                                              checks=CHECKS, timeout=120)
            seen.append(response.status_code)

        fuzz()  # raises with the failing case, shrunk
        calls[operation.label] = seen
    assert all(calls.values()), calls
    STATS.parent.mkdir(parents=True, exist_ok=True)
    STATS.write_text(json.dumps({"operations": len(calls), "requests": sum(map(len, calls.values())),
                                 "statuses": {label: sorted(set(codes)) for label, codes in calls.items()}},
                                indent=1))


def test_an_output_the_safety_check_flags_is_blocked_and_the_answer_says_so(fuzz_url):
    """This app's classifier flags every picture and its policy is the default, block: the
    generation succeeds, each image says it was blocked and has no url, and the stored
    record says the same on a later GET."""
    import httpx

    from tests.conftest import data_url, face_photo

    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=fuzz_url, headers=headers, timeout=120) as client:
        response = client.post("/v1/generations", json={"face_images": [data_url(face_photo())], "seed": 5,
                                                        "width": 64, "height": 64, "num_inference_steps": 1})
        assert response.status_code == 200, response.text
        body = response.json()
        [image] = body["images"]
        assert image["url"] is None and image["safety"] == {"flagged": True, "action": "blocked"}
        assert image["seed"] == 5 and image["watermarked"] is False and "safety" in body["timings_ms"]
        again = client.get(f"/v1/generations/{body['id']}")
        assert again.status_code == 200 and again.json()["images"] == body["images"]
