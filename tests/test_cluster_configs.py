"""cluster/: the AWS launcher config against Ray's own schema; the KubeRay manifests
against serve_config.yaml (they are generated from it) and against what the app needs."""

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster import manifests
from deployments.local import application_config, load_serve_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def serve_config():
    return load_serve_config()


def accelerators(serve_config) -> dict[str, str]:
    return {d["name"]: d["ray_actor_options"].get("accelerator_type")
            for d in application_config(serve_config)["deployments"]}


def test_aws_config_passes_rays_schema_and_has_each_worker_kind(serve_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises on any schema violation
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    needed = accelerators(serve_config)
    small = [t for t in types.values() if t["resources"].get(f"accelerator_type:{needed['FaceEmbedder']}")]
    large = [t for t in types.values() if t["resources"].get(f"accelerator_type:{needed['Generator']}")]
    assert len(small) == 1 and len(large) == 1
    assert small[0]["min_workers"] >= 1 and small[0]["max_workers"] > small[0]["min_workers"]
    assert large[0]["max_workers"] >= 1
    spot = [name for name, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get(
        "MarketType") == "spot"]
    assert spot and raw["head_node_type"] not in spot
    assert sum(t.get("min_workers", 0) for t in types.values()) <= raw["max_workers"]


def test_kuberay_manifests_are_generated_from_serve_config():
    assert manifests.drift() == [], "run `python -m cluster.manifests`"
    assert manifests.main(["--check"]) == 0


def test_rayservice_runs_exactly_the_serve_config(serve_config):
    service = yaml.safe_load((ROOT / "cluster" / "k8s" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    expected = copy.deepcopy(serve_config)
    expected["http_options"].pop("host")
    assert embedded == expected
    assert embedded["http_options"]["port"] == 8000


def test_rayservice_cluster_has_gpu_groups_for_the_stages_and_autoscaling(serve_config):
    cluster = yaml.safe_load((ROOT / "cluster" / "k8s" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for deployment, kind in accelerators(serve_config).items():
        if kind is None:
            continue
        group = next(g for g in groups.values() if f'"accelerator_type:{kind}"' in g["rayStartParams"].get(
            "resources", ""))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, deployment
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["tolerations"]
    for group in groups.values():
        env = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {"INSTANTID_API_KEY_SHA256", "INSTANTID_CACHE"} <= env


def test_rayjob_runs_the_offline_renderer():
    from deployments.cli import _extend
    from pipeline.cli import build_parser

    job = yaml.safe_load((ROOT / "cluster" / "k8s" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "instantid"
    parser, commands = build_parser()
    _extend(commands)
    args = parser.parse_args(argv[1:])
    assert args.command == "render" and args.out.startswith("s3://") and args.weights.startswith("s3://")
    hook = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["worker_process_setup_hook"]
    assert hook == "deployments.ray_setup.setup_worker"


def test_bucket_lifecycle_rules_enforce_the_retention_and_are_valid_s3_requests(serve_config):
    import json

    from botocore.session import get_session
    from botocore.validate import ParamValidator

    from service.config import AppArgs

    rules = json.loads((ROOT / "cluster" / "s3-lifecycle.json").read_text())
    args = AppArgs.model_validate(application_config(serve_config)["args"])
    shape = get_session().create_client("s3", region_name="us-east-1").meta.service_model.operation_model(
        "PutBucketLifecycleConfiguration").input_shape
    for bucket, configuration in rules.items():
        report = ParamValidator().validate({"Bucket": bucket, "LifecycleConfiguration": configuration}, shape)
        assert not report.has_errors(), report.generate_report()
    bucket, _, prefix = args.storage.removeprefix("s3://").partition("/")
    outputs = {r["ID"]: r for r in rules[bucket]["Rules"]}
    days = lambda seconds: -(-seconds // 86400)  # noqa: E731 - whole days, rounded up
    for rule, folder, seconds in (("instantid-faces", "faces/", args.retention.faces_s),
                                  ("instantid-generations", "generations/", args.retention.results_s),
                                  ("instantid-jobs", "jobs/", args.retention.results_s),
                                  ("instantid-uses", "uses/", args.retention.results_s)):
        assert outputs[rule]["Filter"]["Prefix"] == f"{prefix}/{folder}"
        assert outputs[rule]["Expiration"]["Days"] == days(seconds), rule
    assert set(args.input_buckets) <= set(rules)  # uploaded photos expire too
    for name in args.input_buckets:
        assert [r["Expiration"]["Days"] for r in rules[name]["Rules"] if "Days" in r["Expiration"]] == [
            days(args.retention.uploads_s)]
    for name, configuration in rules.items():  # an erased object's older versions do not outlive it by long
        noncurrent = [r for r in configuration["Rules"] if "NoncurrentVersionExpiration" in r]
        assert [(r["Filter"]["Prefix"], r["NoncurrentVersionExpiration"]["NoncurrentDays"]) for r in noncurrent] == [
            (f"{prefix}/" if name == bucket else "", 1)], name
