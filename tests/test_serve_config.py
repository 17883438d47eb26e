"""The production serve_config.yaml, validated by Ray's own schema and by ours."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from deployments.app import DEPLOYMENTS, build_app
from deployments.generator import BATCHING
from deployments.local import application_config, deployment_options, load_serve_config
from service.config import AppArgs


@pytest.fixture(scope="module")
def config():
    return load_serve_config()


def test_ray_accepts_the_config(config):
    schema = ServeDeploySchema.model_validate(config)
    assert [a.name for a in schema.applications] == ["instantid"]


def test_import_path_and_args_are_ours(config):
    application = application_config(config)
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder.__annotations__["args"] in ("AppArgs", AppArgs)
    args = AppArgs.model_validate(application["args"])
    assert args.weights.startswith("s3://") and args.storage.startswith("s3://")
    assert not args.auth.disabled and args.auth.api_keys_env
    assert application["runtime_env"]["worker_process_setup_hook"] == "deployments.ray_setup.setup_worker"


def test_every_stage_is_configured_for_production(config):
    deployments = {d["name"]: d for d in application_config(config)["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    face, generator = deployments["FaceEmbedder"], deployments["Generator"]
    assert 0 < face["ray_actor_options"]["num_gpus"] < 1 and face["ray_actor_options"]["accelerator_type"]
    assert generator["ray_actor_options"]["num_gpus"] == 1 and generator["ray_actor_options"]["accelerator_type"]
    assert generator["max_ongoing_requests"] >= generator["user_config"]["max_batch_images"]
    assert generator["user_config"]["batching"] == BATCHING[0]  # the loop the load benchmark chose, stated
    assert face["max_ongoing_requests"] >= face["user_config"]["max_batch_size"]
    for name in ("Ingress", "FaceEmbedder", "Generator", "Postprocessor"):  # the stages that scale
        entry = deployments[name]
        scaling = entry["autoscaling_config"]
        assert scaling["min_replicas"] <= scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
        assert scaling["upscale_delay_s"] > 0 and scaling["downscale_delay_s"] > 0
        assert entry["max_queued_requests"] > 0  # overload becomes 503, not an unbounded queue
    for name in ("RateLimiter", "Janitor"):  # one replica each: one view of every key's limits
        assert deployments[name]["num_replicas"] == 1 and "autoscaling_config" not in deployments[name]
    assert config["http_options"]["request_timeout_s"] > AppArgs.model_validate(
        application_config(config)["args"]).request_timeout_s


def test_the_local_variant_drops_gpus_and_caps_replicas(config):
    options = deployment_options(application_config(config), gpus=False, max_replicas=1)
    for entry in options.values():
        assert "num_gpus" not in entry.get("ray_actor_options", {})
        assert "accelerator_type" not in entry.get("ray_actor_options", {})
        if "autoscaling_config" in entry:
            assert entry["autoscaling_config"]["max_replicas"] == 1
        else:
            assert entry["num_replicas"] == 1
    kept = deployment_options(application_config(config), gpus=True, max_replicas=None)
    assert kept["Generator"]["ray_actor_options"]["num_gpus"] == 1


def test_the_app_refuses_to_start_without_lasting_signing_keys(monkeypatch):
    """Links and webhook secrets must not change between replicas or across a redeploy: the
    keys come from the environment (or are given explicitly), never drawn at random."""
    from pipeline.errors import InvalidParameter
    from deployments.local import local_args

    for name in ("INSTANTID_URL_SIGNING_KEY", "INSTANTID_WEBHOOK_SIGNING_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = {"weights": "w", "auth": {"disabled": True}, "safety": {"policy": "off"}}  # (no weights at "w")
    with pytest.raises(InvalidParameter, match="INSTANTID_URL_SIGNING_KEY"):
        build_app(args)
    monkeypatch.setenv("INSTANTID_URL_SIGNING_KEY", "u" * 32)
    with pytest.raises(InvalidParameter, match="INSTANTID_WEBHOOK_SIGNING_KEY"):
        build_app(args)
    monkeypatch.setenv("INSTANTID_WEBHOOK_SIGNING_KEY", "short")
    with pytest.raises(InvalidParameter, match="at least 16"):
        build_app(args)
    monkeypatch.setenv("INSTANTID_WEBHOOK_SIGNING_KEY", "w" * 32)
    keys = AppArgs.model_validate(args).signing_keys()
    assert (keys.url, keys.webhook) == ("u" * 32, "w" * 32)
    build_app(args)
    # `instantid serve` (one machine, one run) makes keys of its own when the environment has none
    monkeypatch.delenv("INSTANTID_URL_SIGNING_KEY")
    local = local_args(application_config(load_serve_config()), weights="w", auth={"disabled": True})
    assert len(local.signing_keys().url) == 64 and local.signing_keys().webhook == "w" * 32


def test_the_app_refuses_to_start_without_c2pa_credentials_or_with_bad_ones(monkeypatch):
    """Every output is signed: the app is refused at build time naming the env vars to set
    (or how to turn signing off); credentials that cannot sign say what is wrong."""
    from pipeline.errors import InvalidParameter
    from deployments.local import local_args

    chain = (os.environ["INSTANTID_C2PA_KEY"], os.environ["INSTANTID_C2PA_CERT"])  # the suite's test CA
    args = {"weights": "w", "auth": {"disabled": True}, "safety": {"policy": "off"}}
    monkeypatch.delenv("INSTANTID_C2PA_KEY")
    with pytest.raises(InvalidParameter, match="set the env vars INSTANTID_C2PA_KEY and INSTANTID_C2PA_CERT") as e:
        build_app(args)
    assert e.value.field == "provenance" and "provenance.enabled: false" in str(e.value)
    build_app({**args, "provenance": {"enabled": False}})
    monkeypatch.setenv("INSTANTID_C2PA_KEY", chain[0][:40] + chain[0][60:])  # damaged
    with pytest.raises(InvalidParameter, match="provenance: signing key"):
        build_app(args)
    monkeypatch.setenv("INSTANTID_C2PA_KEY", chain[0])
    monkeypatch.setenv("INSTANTID_C2PA_CERT", chain[1].split("-----END CERTIFICATE-----")[1] + "-----END CERTIFICATE-----")
    with pytest.raises(InvalidParameter, match="does not match the certificate"):  # the root's cert first
        build_app(args)
    # `instantid serve` (one machine, one run) signs with a CA of its own when the env has none
    monkeypatch.delenv("INSTANTID_C2PA_KEY")
    monkeypatch.delenv("INSTANTID_C2PA_CERT")
    local = local_args(application_config(load_serve_config()), weights="w", auth={"disabled": True})
    credentials = local.provenance.credentials("instantid")
    from cryptography import x509

    assert credentials is not None

    [root] = x509.load_pem_x509_certificates(credentials.trust_anchors())
    assert "instantid local run" in root.subject.rfc4514_string()


def test_the_commented_scale_to_zero_option_is_a_valid_generator_config():
    """serve_config.yaml shows scale-to-zero as commented lines under the Generator's
    autoscaling_config: uncommented, Ray takes them and the Generator may have no replica."""
    import re

    import yaml

    from deployments.local import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text()
    options = re.findall(r"^(\s+)# (min_replicas|initial_replicas|downscale_to_zero_delay_s): (\d+)$", text, re.M)
    assert [name for _, name, _ in options] == ["min_replicas", "initial_replicas", "downscale_to_zero_delay_s"]
    uncommented = re.sub(r"^(\s+)# ((?:min_replicas|initial_replicas|downscale_to_zero_delay_s): \d+)$", r"\1\2",
                         text, flags=re.M)
    # the uncommented lines replace the ones above them (YAML keeps a repeated key's last value)
    config = yaml.safe_load(uncommented)
    schema = ServeDeploySchema.model_validate(config)
    [generator] = [d for d in schema.applications[0].deployments if d.name == "Generator"]
    scaling = generator.autoscaling_config
    assert scaling["min_replicas"] == 0 and scaling["initial_replicas"] == 0
    assert scaling["downscale_to_zero_delay_s"] > 0 and scaling["max_replicas"] >= 1


def test_a_safety_policy_needs_the_classifier_in_a_local_weights_root(weights_dir, tmp_path):
    """On by default: a weights root without safety_checker/ is refused at once, naming the
    setting and what to add; 'off' runs without it; a remote root is checked as it loads."""
    from pipeline.errors import InvalidParameter

    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(InvalidParameter, match=r"safety.policy: is 'block', but the weights root .* has no "
                                               r"safety_checker/ and feature_extractor/"):
        build_app({"weights": str(empty), "auth": {"disabled": True}})
    build_app({"weights": str(empty), "auth": {"disabled": True}, "safety": {"policy": "off"}})
    build_app({"weights": str(weights_dir), "auth": {"disabled": True}, "safety": {"policy": "blur"}})
    build_app({"weights": "s3://bucket/weights", "auth": {"disabled": True}})
    with pytest.raises(ValueError, match="safety.policy"):
        build_app({"weights": str(weights_dir), "auth": {"disabled": True}, "safety": {"policy": "hide"}})


def test_after_stop_ray_now_nothing_in_the_process_starts_a_ray_of_its_own():
    """A Serve handle's router left in the process calls Ray from its own thread after the
    stop; Ray's implicit start must not bring up a new local Ray then (it raced the next
    explicit ray.init, and started one at pytest's exit). In a process of its own: the flag
    lasts for the process."""
    code = ("import ray; from deployments.ray_setup import stop_ray_now; stop_ray_now()\n"
            "try:\n    ray.put(0)\nexcept Exception as error:\n    print('refused:', type(error).__name__)\n"
            "print('initialized:', ray.is_initialized())")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["refused: RaySystemError", "initialized: False"], run.stdout + run.stderr
