"""Keeping Ray on the addresses it was given.

Ray Serve 2.60 replicas open an inter-deployment gRPC server on ``[::]:0`` (all
interfaces) with no setting to change it (ray-project/ray#64544). ``setup_worker`` runs in
every worker process (``runtime_env.worker_process_setup_hook``) and binds that server to
the node's own IP instead, which is where callers connect anyway. With the node IP set to
127.0.0.1 (and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), every Ray listener is on loopback.
"""

from __future__ import annotations

import ipaddress
import os

SETUP_HOOK = "deployments.ray_setup.setup_worker"
LOOPBACK = "127.0.0.1"


def setup_worker() -> None:
    import ray

    try:
        from ray.serve._private import replica
    except ImportError:  # pragma: no cover - not a Serve worker
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_instantid_bound", False):
        return

    def bind_to_node_ip(server, address: str):
        host, _, port = address.rpartition(":")
        try:
            unspecified = ipaddress.ip_address(host.strip("[]")).is_unspecified  # all interfaces
        except ValueError:
            unspecified = False
        if unspecified:
            address = f"{ray.util.get_node_ip_address()}:{port}"
        return original(server, address)

    bind_to_node_ip._instantid_bound = True
    replica.add_port_to_grpc_server = bind_to_node_ip


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    env = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.update(extra_env or {})
    return {"worker_process_setup_hook": SETUP_HOOK, "env_vars": env}


def pin_to_loopback() -> None:
    """Make this process's Ray treat the machine as a single-node, loopback-only host.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is first imported; when it was
    imported before this call, the constant it derived is corrected too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def init_loopback_ray(*, num_cpus: int | None = None, num_gpus: int | None = None, temp_dir: str | None = None,
                      extra_env: dict[str, str] | None = None) -> None:
    """Start a local Ray whose every listener is on 127.0.0.1."""
    pin_to_loopback()
    import ray

    ray.init(
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        _temp_dir=temp_dir,
        runtime_env=runtime_env(extra_env),
        logging_level="WARNING",
        log_to_driver=os.environ.get("INSTANTID_RAY_LOGS") == "1",
    )


def start_serve(host: str, port: int, *, proxy_wait_s: float = 600.0) -> None:
    """``serve.start`` with its HTTP proxy on ``host:port``, patient on a loaded machine.

    Serve waits a fixed 60 s for its proxy (``HTTP_PROXY_TIMEOUT``, no setting) and then
    raises, though the proxy is usually still starting. Past that, wait for the proxy to
    answer ``/-/healthz`` (up to ``proxy_wait_s``) and connect to the running controller."""
    import time
    import urllib.request

    from ray import serve

    try:
        serve.start(http_options={"host": host, "port": port})
        return
    except TimeoutError as error:
        if "HTTP proxies not available" not in str(error):
            raise
    deadline = time.monotonic() + proxy_wait_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/-/healthz", timeout=10) as answer:
                if answer.status == 200:
                    break
        except OSError:  # refused, reset, or an HTTP error (urllib's errors are OSErrors)
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve's HTTP proxy on {host}:{port} did not answer in {proxy_wait_s:.0f} s")
        time.sleep(1.0)
    serve.start(http_options={"host": host, "port": port})  # the controller runs: this connects to it


def stop_ray_now() -> None:
    """End this process's Ray and every Serve replica on it at once, without Serve's
    graceful drain of each application (seconds per app), and forget Serve's cached
    controller client so that a Ray started later in this process gets its own. (The cache
    is keyed by job id, which a fresh cluster hands out again from 1.) For throw-away
    clusters: tests and benchmarks; a user's ``instantid serve`` drains gracefully.

    Ray's implicit start is turned off for the rest of the process: a Serve handle's router
    pushes metrics from a thread of its own, and after the shutdown its next push (a
    ``ray.wait``) would start a new local Ray, racing the Ray this process starts next (an
    explicit ``ray.init`` then fails: already initialised) or left starting at exit."""
    import ray
    from ray._private import auto_init_hook

    ray.shutdown()
    auto_init_hook.enable_auto_connect = False  # read on each call (RAY_ENABLE_AUTO_CONNECT=0 at import)
    try:
        from ray.serve.context import _set_global_client
    except ImportError:  # a Ray without it: nothing cached there to forget
        return
    _set_global_client(None)
