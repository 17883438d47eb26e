"""Shared fixtures: fixture weights written once per session, one loaded pipeline,
synthetic face photos, and a real S3-compatible server."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# One thread per process for torch's and BLAS's pools, read when they are loaded (so before
# numpy) and inherited by every process the suite starts: Ray's workers, the commands, the
# benchmarks. The fixture models are tiny and the suite runs several processes on two cores;
# a second torch thread spins (libgomp) at every parallel region waiting for the first. With
# one core kept busy, test_pipeline and test_stepping took 68 s with two threads, 24 s with one
# (26 s against 25 s quiet). MKL_CBWR=AUTO: MKL's reproducible mode, whose results do not
# depend on the operands' alignment (one thread without it once rendered a LoRA switched off
# 1/255 away from the image before it, in 0250596's clean-clone run; not reproduced here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_CBWR", "AUTO")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before anything imports ray: loopback only
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray's telemetry: no report leaves the machine
# Start-up timeouts of Ray's own actors, sized for a loaded 2-core machine (Serve's HTTP
# proxy must answer its ready check within 5 s by default, else it is killed). Every Ray of
# the suite inherits them: the session's, and those of the commands the tests start.
for _name, _seconds in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120"),
                        ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60"),
                        ("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "30"),
                        # Serve's own idle work, measured with two apps up and nothing asked of
                        # them: 0.37 of this machine's 2 cores by default, 0.20 with these (the
                        # controller's loop 10 -> 2 times a second; metrics sent when recorded,
                        # not polled 10 times a second in every replica)
                        ("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5"),
                        ("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "0")):
    os.environ.setdefault(_name, _seconds)
# the node cache (remote weights, weights converted to the dtype loaded) of this session
# only, never the user's ~/.cache: every process the suite starts inherits it
if "INSTANTID_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["INSTANTID_CACHE"] = tempfile.mkdtemp(prefix="instantid-cache-")
    atexit.register(shutil.rmtree, os.environ["INSTANTID_CACHE"], True)
# the app signs links and webhooks with keys from the environment (as production does)
os.environ.setdefault("INSTANTID_URL_SIGNING_KEY", "test-url-signing-key-0123456789")
os.environ.setdefault("INSTANTID_WEBHOOK_SIGNING_KEY", "test-webhook-signing-key-0123456789")
# and every output with C2PA credentials from there too: a test CA made for this session
if "INSTANTID_C2PA_KEY" not in os.environ:
    import tempfile

    from pipeline.provenance import make_test_chain

    with tempfile.TemporaryDirectory() as _folder:
        _chain = make_test_chain(_folder, name="instantid test suite")
        os.environ["INSTANTID_C2PA_KEY"] = _chain.key.read_text()
        os.environ["INSTANTID_C2PA_CERT"] = _chain.cert.read_text()

DATA = Path(__file__).parent / "data"
# the attestation POST /v1/faces requires
CONSENT = {"attested_by": "the test suite", "basis": "synthetic pictures of no one"}


def face_photo(size=(256, 256), blobs=((128, 128, 50),), background=(20, 20, 20), color=(240, 220, 200)) -> Image.Image:
    """A picture the fixture detector sees faces in: one bright disc per ``(cx, cy, r)``."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for cx, cy, r in blobs:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    return image


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    from pipeline.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def flagging_weights_dir(weights_dir, tmp_path_factory) -> Path:
    """The fixture weights with a safety checker that flags every picture (each concept's
    threshold below any cosine); the models are links to the session's."""
    from pipeline.fixtures import write_safety_checker

    root = tmp_path_factory.mktemp("flagging-weights")
    for entry in weights_dir.iterdir():
        if entry.name not in ("safety_checker", "feature_extractor"):
            (root / entry.name).symlink_to(entry)
    write_safety_checker(root, threshold=-1.01)
    return root


@pytest.fixture(scope="session")
def pipe(weights_dir):
    from pipeline.pipeline import InstantIDPipeline

    return InstantIDPipeline.from_weights(weights_dir)


@pytest.fixture(scope="session")
def face(pipe):
    """The analysed face of a standard synthetic photo."""
    return pipe.analyze_faces(face_photo())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.s3server import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}.get(fmt, "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


class RayRuntime:
    """One loopback Ray with Serve's HTTP proxy for the whole session, started on first
    use; a test module that needs a Ray of its own (a multi-node cluster) stops it first,
    and the next module that needs it starts it again."""

    def __init__(self, temp_dir: str, s3_server) -> None:
        self.temp_dir, self.s3_server, self.url = temp_dir, s3_server, None
        self.apps: dict[str, str] = {}  # shared app fixture -> its Serve application name

    def ensure(self) -> str:
        if self.url is None:
            from deployments.ray_setup import init_loopback_ray, start_serve
            from tests.s3server import free_ports

            # its nodes get the test S3 server's endpoint and credentials, as cluster nodes get theirs
            os.environ.update(self.s3_server.env())
            init_loopback_ray(num_cpus=16, temp_dir=self.temp_dir)
            port = free_ports(1)[0]
            start_serve("127.0.0.1", port)
            self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        """Stop Ray, which ends every replica at once (Serve's own shutdown would wait for
        each app to drain: seconds per app)."""
        from deployments.ray_setup import stop_ray_now

        if self.url is not None:
            try:
                stop_ray_now()  # no drain: every replica ends with its Ray
            finally:
                self.url = None
                self.apps.clear()

    def retire(self, needed: set[str]) -> None:
        """Delete the shared apps that no later test needs (their idle replicas would cost CPU
        that every later test pays)."""
        from ray import serve

        for fixture, name in list(self.apps.items()):
            if fixture not in needed:
                serve.delete(name, _blocking=False)
                del self.apps[fixture]


@contextlib.contextmanager
def loopback_cluster(s3_server, **head):
    """A Ray cluster of a test's own on this machine, on loopback (``ray.cluster_utils``:
    nodes started as `ray start` starts them). ``head``: the head node's options (num_cpus,
    object_store_memory, ...); the caller adds any other node. Every node's environment has
    the test S3 server's endpoint and credentials. Shut down, its files removed, when the
    block ends."""
    import shutil
    import tempfile

    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    from deployments.ray_setup import pin_to_loopback

    pin_to_loopback()
    os.environ.update(s3_server.env())
    temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # Ray's socket paths must stay short
    # the cluster's address is written there, and on a fresh machine nothing made the folder yet
    Path(get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"temp_dir": temp, **head})
    try:
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


_RUNTIME: list[RayRuntime] = []  # the session's, once started (for the hooks below)
_ORDER: list[pytest.Item] = []  # the tests in the order they run


@pytest.fixture(scope="session")
def ray_runtime(tmp_path_factory, s3_server):
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths must stay short
    runtime = RayRuntime(temp, s3_server)
    _RUNTIME.append(runtime)
    yield runtime
    _RUNTIME.clear()
    runtime.stop()
    shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------- module order
# Modules without the session's Ray come first (the benchmark, the demo, the multi-node
# cluster and the offline render, marked own_ray, start Rays of their own); then those on
# the session's Ray without a shared app; then those of the S3 app, of both apps, of the
# local app. Each shared app is deleted after the last test that uses it. Within a rank,
# modules keep their file order.
#
# `make test` runs the suite in two processes (pytest-xdist, ``--dist loadgroup``): the
# modules of rank 0 in one, those on the session's Ray in the other, each in this order. Run
# alone, the suite left a third of the machine's CPU time idle (tests waiting on replicas
# starting, on a Ray of their own, on a subprocess); the other process's tests fill it.
OWN_PROCESS, SESSION_RAY = "apart", "session-ray"  # the two groups


def _rank(fixtures: set[str], own_ray: bool) -> int:
    if own_ray or "ray_runtime" not in fixtures:
        return 0
    s3, local = "s3_app" in fixtures, "local_app" in fixtures
    return {(False, False): 1, (True, False): 2, (True, True): 3, (False, True): 4}[(s3, local)]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(session, config, items):
    used: dict[Path, set[str]] = {}
    own_ray: dict[Path, bool] = {}
    for item in items:
        used.setdefault(item.path, set()).update(item.fixturenames)
        own_ray[item.path] = own_ray.get(item.path, False) or item.get_closest_marker("own_ray") is not None
    ranks = {path: _rank(fixtures, own_ray[path]) for path, fixtures in used.items()}
    items.sort(key=lambda item: ranks[item.path])  # stable: file order within a rank
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SESSION_RAY if ranks[item.path] else OWN_PROCESS))
    _ORDER[:] = items


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_node_collection_finished(node, ids):
    """Under ``--dist loadgroup`` each test's node id carries its group: without it (a pytest
    that this pytest-xdist cannot mark), every module would start a Ray in each process."""
    if node.config.getoption("dist", "no") == "loadgroup" and any("@" not in nodeid for nodeid in ids):
        pytest.exit("pytest-xdist lost the test groups (--dist loadgroup) with this pytest: "
                    "install the versions of constraints.txt (make setup)", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    if _RUNTIME and (nextitem is None or nextitem.path != item.path) and item in _ORDER:
        later = _ORDER[_ORDER.index(nextitem):] if nextitem is not None else []
        _RUNTIME[0].retire(set().union(*(i.fixturenames for i in later)))
    return result


@pytest.fixture(scope="module")
def ray_serve(ray_runtime):
    """A real Ray (pinned to loopback, token auth off for tests) with Serve's HTTP proxy on
    a free loopback port. Yields the base URL."""
    return ray_runtime.ensure()


# ----------------------------------------------------------------------------- shared apps
# Deploying an application takes a while on this machine: modules that can share one do.

def _keys():
    from deployments.auth import new_key

    return new_key()


KEY_A, DIGEST_A = _keys()
KEY_B, DIGEST_B = _keys()
KEY_Q, DIGEST_Q = _keys()
KEY_J, DIGEST_J = _keys()


def local_test_options(**generator) -> dict:
    """The production deployment settings, adapted as `instantid serve` adapts them."""
    from deployments.local import application_config, deployment_options, load_serve_config

    options = deployment_options(application_config(load_serve_config()), gpus=False, max_replicas=1, cpu_cap=0.5)
    options["Generator"].update(generator)
    return options


@pytest.fixture(scope="session")
def local_app(ray_runtime, weights_dir, tmp_path_factory):
    """The app on a local-folder store: async jobs, webhooks to loopback, the web page. Its
    args and deployment options come along, for a test that redeploys it changed. Started
    once for the session: 15-75 s, over 60 s beside the suite's other process (every
    deployment's replicas start at once, the Generator loads the fixture weights), counted in
    the first test that uses it."""
    from ray import serve

    from deployments.app import build_app

    url = ray_runtime.ensure()
    storage = tmp_path_factory.mktemp("local-app-storage")
    args = {
        "weights": str(weights_dir), "storage": str(storage),
        "auth": {"api_key_sha256": [DIGEST_A, DIGEST_B], "api_keys_env": ""},
        "webhook_allowlist": ["127.0.0.1"], "webhook_allow_private": True, "webhook_backoff_s": 0.1,
        "job_lease_s": 4, "limits": {"max_steps": 150, "max_side": 512},
        "fairness": {"event_streams_per_key": 3},
        "loras": {"missing": "/nonexistent/lora.safetensors"},  # a job that fails in the render
    }
    options = local_test_options(graceful_shutdown_timeout_s=5)
    options["JobRunner"]["graceful_shutdown_timeout_s"] = 20
    serve.run(build_app(args, options), name="local", route_prefix="/local")
    ray_runtime.apps["local_app"] = "local"
    return {"url": f"{url}/local", "storage": storage, "args": args, "options": options}


@pytest.fixture(scope="session")
def s3_app(ray_runtime, weights_dir, s3_server):
    """The app on SeaweedFS: faults, hardening. Started once for the session: 30-70 s, counted
    in the first test that uses it."""
    from ray import serve

    from deployments.app import build_app

    url = ray_runtime.ensure()
    for bucket in ("hardening", "hardening-uploads"):
        s3_server.client().create_bucket(Bucket=bucket)
    args = {
        "weights": str(weights_dir), "storage": "s3://hardening/svc", "s3_endpoint_url": s3_server.endpoint,
        "input_buckets": ["hardening-uploads"], "request_timeout_s": 120,
        "auth": {"api_key_sha256": [DIGEST_A, DIGEST_B, DIGEST_Q], "api_keys_env": ""},
        "retention": {"faces_s": 600, "results_s": 600},
        "limits": {"max_side": 512, "max_steps": 150, "max_image_bytes": 2 * 1024 * 1024,
                   "max_body_bytes": 4 * 1024 * 1024},
    }
    options = local_test_options(graceful_shutdown_timeout_s=5)
    # the static loop (the local app runs the default, step-level one); requests sent
    # together are batched together, even when they reach the Generator apart
    options["Generator"]["user_config"].update(batching="request", batch_wait_timeout_s=0.5)
    serve.run(build_app(args, options), name="s3app", route_prefix="/s3app")
    ray_runtime.apps["s3_app"] = "s3app"
    return {"url": f"{url}/s3app", "bucket": "hardening", "prefix": "svc", "app": "s3app"}
