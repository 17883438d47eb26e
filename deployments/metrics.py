"""Application metrics, exported with Serve's own through Ray's Prometheus endpoint.
Created lazily inside replicas (metrics need a running Ray worker)."""

from __future__ import annotations

from functools import cache

LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
STEP_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


@cache
def face_latency_ms():
    from ray.serve.metrics import Histogram

    return Histogram("instantid_face_latency_ms", description="Face stage time per request (ms).",
                     boundaries=LATENCY_BUCKETS_MS)


@cache
def diffusion_seconds_per_step():
    from ray.serve.metrics import Histogram

    return Histogram("instantid_diffusion_seconds_per_step", description="Denoising seconds per step of a batch.",
                     boundaries=STEP_BUCKETS_S)


@cache
def batch_size():
    from ray.serve.metrics import Histogram

    return Histogram("instantid_batch_size", description="Images rendered together in one batch.",
                     boundaries=BATCH_BUCKETS)


@cache
def images_generated():
    from ray.serve.metrics import Counter

    return Counter("instantid_images_generated_total", description="Images generated.")


@cache
def errors():
    from ray.serve.metrics import Counter

    return Counter("instantid_errors_total", description="Requests that ended in an error, by error code.",
                   tag_keys=("code",))
