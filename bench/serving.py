"""Serving benchmarks on fixture weights, through the production app (``deployments.app``)
on a loopback Ray, over real HTTP:

* ``overhead``: the same generation request over HTTP through Serve vs a direct pipeline
  call in this process (face analysis + render + PNG encoding: the work the service does
  for the request), interleaved, as a ratio at p50 and p95.
* ``batching``: throughput (images/s) at concurrency 1/4/8, with the Generator's
  ``max_batch_images`` (its ``user_config``) at 1 vs 4, in serve_config.yaml's loop.
* ``load`` (:mod:`bench.load`): open-loop Poisson load, the static and the step-level
  loop side by side.

The Generator replica gets ``num_cpus`` = the direct call's torch threads (torch's own count:
the cores, or ``OMP_NUM_THREADS`` where the environment sets it), so both use as many: Ray
sets a replica's ``OMP_NUM_THREADS`` from its ``num_cpus``, or passes on the one set.
"""

from __future__ import annotations

import io
import os
import secrets
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import Results, summarize
from .images import data_url, synthetic_face

OVERHEAD_COLUMNS = ("width", "height", "steps", "cfg", "torch_threads", "direct_median_s", "direct_p95_s",
                    "http_median_s", "http_p95_s", "ratio_p50", "ratio_p95", "overhead_p50_ms", "overhead_p95_ms",
                    "server_total_median_ms")
BATCHING_COLUMNS = ("batching", "max_batch_images", "concurrency", "requests", "width", "height", "steps",
                    "images_per_s_median", "images_per_s_min", "images_per_s_max", "images_per_s_spread_pct",
                    "latency_p50_s", "latency_p95_s", "mean_batch_size", "speedup_vs_batch1")


class ServeSession:
    """A loopback Ray with Serve's HTTP proxy and the production app on ``weights``.

    :meth:`deploy` changes only the Generator's ``user_config`` between benchmarks. Serve
    gives every deployment of a ``serve.run`` from Python a fresh random version, which
    restarts every replica (tens of seconds here); a config deploy (``serve deploy``, as
    in production) keeps versions, so such a change is a light ``reconfigure``. The
    benchmark gets the production behaviour by pinning the versions (Serve's
    ``options(version=..., _internal=True)``), and falls back to a full redeploy when a
    Ray version no longer takes that."""

    def __init__(self, weights: str | Path, workdir: str | Path, *, threads: int | None = None) -> None:
        self.weights = str(weights)
        self.workdir = Path(workdir)
        if threads is None:
            import torch

            threads = torch.get_num_threads()  # the cores, or OMP_NUM_THREADS where it is set
        self.threads = threads
        self.url = ""
        self.deployed: tuple[int, float, str] | None = None  # max_batch_images, batch_wait_timeout_s, batching
        self._args = None
        self._pin_versions = True

    def __enter__(self) -> "ServeSession":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local cluster, as in the tests
        from deployments.ray_setup import init_loopback_ray, start_serve

        init_loopback_ray(num_cpus=max(16, 2 * (self.threads + 2)), temp_dir=str(self.workdir / "ray"))
        port = free_port()
        start_serve("127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def deploy(self, max_batch_images: int = 4, *, batch_wait_timeout_s: float = 0.05,
               batching: str | None = None) -> None:
        """Run the app with this Generator ``user_config`` (nothing to do when it already
        runs); ``batching`` None: serve_config.yaml's loop."""
        from deployments.generator import BATCHING
        from deployments.local import application_config, deployment_options, has_gpu, load_serve_config

        options = deployment_options(application_config(load_serve_config()), gpus=has_gpu(), max_replicas=1,
                                     cpu_cap=0.5)
        generator = options["Generator"]
        batching = batching or generator.get("user_config", {}).get("batching", BATCHING[0])
        if self.deployed == (max_batch_images, batch_wait_timeout_s, batching):
            return
        generator["user_config"] = {**generator.get("user_config", {}), "max_batch_images": max_batch_images,
                                    "batch_wait_timeout_s": batch_wait_timeout_s, "batching": batching}
        self._run(options)
        self.deployed = (max_batch_images, batch_wait_timeout_s, batching)

    def deploy_changed(self, change) -> None:
        """Run the app with serve_config.yaml's deployment options as ``change`` (a function
        of the options by deployment name) makes them, e.g.
        :func:`bench.coldstart.scale_to_zero`."""
        from deployments.local import application_config, deployment_options, has_gpu, load_serve_config

        options = deployment_options(application_config(load_serve_config()), gpus=has_gpu(), max_replicas=1,
                                     cpu_cap=0.5)
        self._run(change(options))
        self.deployed = None  # a later deploy() runs its own config again

    def _run(self, options: dict[str, dict]) -> None:
        from ray import serve

        from deployments.app import build_app
        from service.config import AppArgs

        generator = options["Generator"]
        if self._args is None:  # made once: the signing keys of this session stay put across redeploys
            # requests ask for one image each; max_num_images is also the Generator's smallest batch cap
            self._args = AppArgs.model_validate({"weights": self.weights, "storage": str(self.workdir / "storage"),
                                                 "auth": {"disabled": True}, "limits": {"max_num_images": 1},
                                                 "url_signing_key": secrets.token_hex(32),
                                                 "webhook_signing_key": secrets.token_hex(32)})
        generator.setdefault("ray_actor_options", {})["num_cpus"] = self.threads  # torch threads as the direct call
        if self._pin_versions:
            pinned = {name: {**entry, "version": "bench", "_internal": True} for name, entry in options.items()}
            try:
                app = build_app(self._args, pinned)
            except (TypeError, ValueError):  # this Ray takes no pinned versions: full redeploys then
                self._pin_versions = False
        if not self._pin_versions:
            app = build_app(self._args, options)
        serve.run(app, name="bench", route_prefix="/")

    def __exit__(self, *exc) -> None:
        from deployments.ray_setup import stop_ray_now

        # the session's own cluster: every replica goes with it (no graceful drain to wait for), and
        # Serve forgets it (a later session in this process starts a cluster of its own)
        stop_ray_now()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(photo_url: str, width: int, height: int, steps: int, seed: int, guidance: float) -> dict:
    return {"face_images": [photo_url], "prompt": "a portrait", "width": width, "height": height,
            "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}


def post(client, body: dict) -> dict:
    response = client.post("/v1/generations", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"generation failed: {response.status_code} {response.text[:300]}")
    return response.json()


def run_overhead(session: ServeSession, out: Path, *, width: int, height: int, steps: int, guidance: float,
                 repeats: int, warmup: int) -> Results:
    import httpx
    import torch

    from pipeline import get_pipeline

    results = Results(out, "overhead", OVERHEAD_COLUMNS, repeats=repeats, warmup=warmup,
                      title="Serving overhead: HTTP through Serve vs a direct pipeline call",
                      table=("width", "height", "steps", "direct_median_s", "http_median_s", "ratio_p50",
                             "ratio_p95", "overhead_p50_ms", "overhead_p95_ms"))
    session.deploy(4)  # the production user_config (and whatever runs already if that is it)
    url = session.url
    torch.set_num_threads(session.threads)
    photo = synthetic_face()
    photo_url = data_url(photo)
    pipe = get_pipeline(session.weights)

    def direct(seed: int) -> float:
        started = time.perf_counter()
        result = pipe(photo, "a portrait", width=width, height=height, num_inference_steps=steps,
                      guidance_scale=guidance, seed=seed)
        buffer = io.BytesIO()
        result.images[0].save(buffer, format="PNG")
        return time.perf_counter() - started

    direct_s, http_s, server_ms = [], [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for k in range(warmup + repeats):
            d = direct(k)
            started = time.perf_counter()
            body = post(client, request_body(photo_url, width, height, steps, k, guidance))
            h = time.perf_counter() - started
            if k >= warmup:
                direct_s.append(d)
                http_s.append(h)
                server_ms.append(float(body.get("timings_ms", {}).get("total", float("nan"))))
    d, h = summarize(direct_s), summarize(http_s)
    results.add(case=f"{width}x{height}_{steps}steps", width=width, height=height, steps=steps, cfg=guidance > 1,
                torch_threads=session.threads, direct_median_s=d["median"], direct_p95_s=d["p95"],
                http_median_s=h["median"], http_p95_s=h["p95"], ratio_p50=h["median"] / d["median"],
                ratio_p95=h["p95"] / d["p95"], overhead_p50_ms=(h["median"] - d["median"]) * 1000,
                overhead_p95_ms=(h["p95"] - d["p95"]) * 1000,
                server_total_median_ms=statistics.median(server_ms) if server_ms else None)
    results.close()
    return results


def run_batching(session: ServeSession, out: Path, *, width: int, height: int, steps: int, guidance: float,
                 concurrencies: list[int], batch_sizes: list[int], requests_per_client: int, repeats: int,
                 warmup: int) -> Results:
    import httpx

    results = Results(out, "batching", BATCHING_COLUMNS, repeats=repeats, warmup=warmup,
                      title="Batching: throughput by concurrency and the Generator's max_batch_images",
                      table=("batching", "max_batch_images", "concurrency", "requests", "images_per_s_median",
                             "images_per_s_spread_pct", "latency_p50_s", "latency_p95_s", "mean_batch_size",
                             "speedup_vs_batch1"))
    photo_url = data_url(synthetic_face())
    seed = iter(range(10**9))
    lock = threading.Lock()
    measured: dict[tuple[int, int], dict] = {}
    loops: dict[int, str] = {}
    current = session.deployed[0] if session.deployed else None
    for batch in sorted(batch_sizes, key=lambda b: b != current):  # what runs already first
        session.deploy(batch)  # serve_config.yaml's loop
        loops[batch] = session.deployed[2]
        with httpx.Client(base_url=session.url, timeout=600,
                          limits=httpx.Limits(max_connections=max(concurrencies) + 2)) as client:
            for concurrency in concurrencies:
                latencies: list[float] = []
                batch_seen: list[int] = []

                def one_client(_: int) -> None:
                    for _ in range(requests_per_client):
                        with lock:
                            body = request_body(photo_url, width, height, steps, next(seed), guidance)
                        started = time.perf_counter()
                        answer = post(client, body)
                        with lock:
                            latencies.append(time.perf_counter() - started)
                            batch_seen.append(int(answer.get("batch_size", 1)))

                throughputs, kept_latencies, kept_batches = [], [], []
                for round_ in range(warmup + repeats):
                    latencies.clear()
                    batch_seen.clear()
                    started = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        list(pool.map(one_client, range(concurrency)))
                    wall = time.perf_counter() - started
                    if round_ >= warmup:
                        throughputs.append(concurrency * requests_per_client / wall)
                        kept_latencies += latencies
                        kept_batches += batch_seen
                measured[(batch, concurrency)] = {"throughput": summarize(throughputs),
                                                  "latency": summarize(kept_latencies),
                                                  "batch": statistics.mean(kept_batches)}
    for batch in batch_sizes:
        for concurrency in concurrencies:
            m = measured[(batch, concurrency)]
            t, lat = m["throughput"], m["latency"]
            base = measured[(batch_sizes[0], concurrency)]["throughput"]["median"]
            results.add(case=f"batch{batch}_c{concurrency}", batching=loops[batch], max_batch_images=batch,
                        concurrency=concurrency,
                        requests=concurrency * requests_per_client, width=width, height=height, steps=steps,
                        images_per_s_median=t["median"], images_per_s_min=t["min"], images_per_s_max=t["max"],
                        images_per_s_spread_pct=t["spread_pct"], latency_p50_s=lat["median"],
                        latency_p95_s=lat["p95"], mean_batch_size=m["batch"],
                        speedup_vs_batch1=t["median"] / base if base else None)
    results.close()
    return results
