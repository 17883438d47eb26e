"""``instantid serve``: the production application (``serve_config.yaml``) on one machine.

Same builder, same per-deployment settings; adapted to a laptop or a single box: a local
Ray pinned to loopback, GPU requirements dropped when there is no GPU, replicas capped,
local storage by default, auth off unless keys are given (then loopback only).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InvalidParameter
from service.config import AppArgs

from .app import build_app

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def load_serve_config(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no Serve config at {path}")
    return yaml.safe_load(path.read_text())


def application_config(config: dict[str, Any], name: str = "instantid") -> dict[str, Any]:
    for application in config["applications"]:
        if application["name"] == name:
            return application
    raise KeyError(f"no application {name!r} in the Serve config")


def deployment_options(application: dict[str, Any], *, gpus: bool, max_replicas: int | None,
                       cpu_cap: float | None = None) -> dict[str, dict]:
    """The config's ``deployments`` entries as ``.options()`` overrides, adapted: GPU
    requirements dropped when ``gpus`` is false, replicas and CPUs capped when asked."""
    options: dict[str, dict] = {}
    for entry in copy.deepcopy(application.get("deployments", [])):
        name = entry.pop("name")
        actor = entry.get("ray_actor_options", {})
        if not gpus:
            actor.pop("num_gpus", None)
            actor.pop("accelerator_type", None)
        if "num_cpus" in actor and cpu_cap is not None:
            actor["num_cpus"] = min(actor["num_cpus"], cpu_cap)
        scaling = entry.get("autoscaling_config")
        if scaling and max_replicas is not None:
            scaling["max_replicas"] = min(scaling.get("max_replicas", 1), max_replicas)
            for key in ("min_replicas", "initial_replicas"):
                if key in scaling:
                    scaling[key] = min(scaling[key], scaling["max_replicas"])
        options[name] = entry
    return options


def local_args(application: dict[str, Any], **overrides: Any) -> AppArgs:
    """The config's app args with local overrides (weights, storage, auth...)."""
    args = copy.deepcopy(application.get("args", {}))
    for key in ("weights_cache", "input_buckets"):
        args.pop(key, None)
    args.update({k: v for k, v in overrides.items() if v is not None})
    # one machine, one run: signing keys of this run unless the environment has lasting ones
    for name in ("url_signing_key", "webhook_signing_key"):
        if not os.environ.get(args.get(f"{name}_env") or AppArgs.model_fields[f"{name}_env"].default):
            args.setdefault(name, secrets.token_hex(32))
    parsed = AppArgs.model_validate(args)
    provenance = parsed.provenance
    if provenance.enabled and not (os.environ.get(provenance.key_env) or provenance.key_pem):
        args["provenance"] = {**args.get("provenance", {}), **run_c2pa_credentials()}
        parsed = AppArgs.model_validate(args)
    return parsed


def run_c2pa_credentials() -> dict[str, str]:
    """A C2PA signing key and chain made for this run alone (a throwaway CA no one trusts:
    the manifests validate, and say who made the image, but only lasting credentials in
    $INSTANTID_C2PA_KEY/$INSTANTID_C2PA_CERT make them trusted anywhere)."""
    import tempfile

    from pipeline.provenance import make_test_chain

    with tempfile.TemporaryDirectory() as folder:
        files = make_test_chain(folder, name="instantid local run", days=365)
        return {"key_pem": files.key.read_text(), "cert_pem": files.cert.read_text()}


KEYS_ENV = AppArgs.model_fields["auth"].default_factory().api_keys_env  # INSTANTID_API_KEY_SHA256
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access(host: str, api_key_sha256: list[str], allowed_hosts: list[str]) -> dict[str, Any]:
    """The app args that decide who may call a local server: auth (the keys given, and those
    in $INSTANTID_API_KEY_SHA256) and the Host names it answers to. Without any key it
    listens on loopback only; on loopback it answers only to loopback names, so a web page
    on another site cannot reach it by rebinding its own name to 127.0.0.1."""
    keys = list(api_key_sha256)
    from_env = bool(os.environ.get(KEYS_ENV, "").strip())
    if not keys and not from_env and not is_loopback(host):
        raise InvalidParameter("--host", f"serving on {host} (not loopback) needs API keys: give --api-key-sha256 "
                                         f"or set ${KEYS_ENV} (see `instantid hash-key`)")
    hosts = list(allowed_hosts) or (LOOPBACK_NAMES if is_loopback(host) else [])
    return {"auth": {"disabled": not keys and not from_env, "api_key_sha256": keys, "api_keys_env": KEYS_ENV},
            "allowed_hosts": hosts}


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def serve_locally(
    *,
    weights: str,
    storage: str,
    port: int,
    host: str = "127.0.0.1",
    config_path: str | None = None,
    api_key_sha256: list[str] | None = None,
    max_replicas: int = 1,
    s3_endpoint: str | None = None,
    allowed_hosts: list[str] | None = None,
    on_ready=None,
    stop: threading.Event | None = None,
    safety_policy: str | None = None,
) -> None:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down cleanly."""
    from ray import serve

    from .ray_setup import init_loopback_ray, start_serve

    application = application_config(load_serve_config(config_path))
    args = local_args(application, weights=weights, storage=storage, s3_endpoint_url=s3_endpoint,
                      safety={"policy": safety_policy} if safety_policy else None,
                      **access(host, list(api_key_sha256 or []), list(allowed_hosts or [])))
    gpus = has_gpu()
    # one small machine runs every stage: logical CPU requests are capped too
    options = deployment_options(application, gpus=gpus, max_replicas=max_replicas, cpu_cap=0.5)
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    init_loopback_ray(num_cpus=max(os.cpu_count() or 1, 4))
    try:
        start_serve(host, port)
        serve.run(build_app(args, options), name=application["name"], route_prefix=application.get("route_prefix", "/"))
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        while not stop.wait(0.5):
            pass
    finally:
        import ray

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
