"""``instantid serve``: the production application (``serve_config.yaml``) on one machine.

Same builder, same per-deployment settings; adapted to a laptop or a single box: a local
Ray pinned to loopback, GPU requirements dropped when there is no GPU, replicas capped,
local storage by default, auth off unless keys are given.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

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
    return AppArgs.model_validate(args)


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
    on_ready=None,
    stop: threading.Event | None = None,
) -> None:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down cleanly."""
    from ray import serve

    from .ray_setup import init_loopback_ray

    application = application_config(load_serve_config(config_path))
    keys = list(api_key_sha256 or [])
    args = local_args(
        application,
        weights=weights,
        storage=storage,
        s3_endpoint_url=s3_endpoint,
        auth={"disabled": not keys, "api_key_sha256": keys, "api_keys_env": ""},
    )
    gpus = has_gpu()
    # one small machine runs every stage: logical CPU requests are capped too
    options = deployment_options(application, gpus=gpus, max_replicas=max_replicas, cpu_cap=0.5)
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    init_loopback_ray(num_cpus=max(os.cpu_count() or 1, 4))
    try:
        serve.start(http_options={"host": host, "port": port})
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
