"""Open-loop load test of the Generator's two batching loops, side by side on one Ray
(``python -m bench load``; also part of ``python -m bench serving``).

1. Capacity: closed-loop clients (twice ``max_batch_images`` of them, the step counts of
   the mix in turn) keep the static path (``batching: request``) saturated; its images/s
   is the capacity.
2. One arrival schedule, drawn once from a seed: Poisson arrivals at ``fraction`` of that
   capacity, each request's step count drawn from the mix.
3. The same schedule against each loop (``request``, then ``step``: a light
   ``reconfigure`` of the running app in between), after one warm-up request per step
   count. Latency runs from a request's scheduled arrival to its answer (a late send
   counts against the server, not for it); images/s is the images answered over the
   time from the first arrival to the last answer; the mean batch size is the answers'
   ``batch_size`` (images per forward, averaged over a request's steps in step mode).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import Results, percentile
from .images import data_url, synthetic_face
from .serving import ServeSession, request_body

LOAD_COLUMNS = ("batching", "load_fraction", "capacity_images_per_s", "arrival_rate_per_s", "requests", "answered",
                "failed", "width", "height", "steps_mix", "max_batch_images", "images_per_s", "latency_p50_s",
                "latency_p95_s", "latency_p99_s", "latency_max_s", "mean_batch_size", "p95_vs_request",
                "images_per_s_vs_request")
MODES = ("request", "step")  # the baseline first


def poisson_schedule(count: int, rate: float, steps_mix: list[int], seed: int) -> list[tuple[float, int]]:
    """``count`` (arrival second, steps) pairs: exponential gaps of mean ``1/rate``, the
    first arrival at 0, each step count drawn uniformly from ``steps_mix``."""
    if count < 1 or rate <= 0 or not steps_mix:
        raise ValueError(f"a schedule needs requests, a positive rate and step counts, not {count}, {rate}, "
                         f"{steps_mix}")
    draw = random.Random(seed)
    at, schedule = 0.0, []
    for k in range(count):
        if k:
            at += draw.expovariate(rate)
        schedule.append((at, draw.choice(steps_mix)))
    return schedule


def _send(client, photo_url: str, width: int, height: int, steps: int, seed: int, guidance: float):
    """One request; (its answer's batch size, None) or (None, why it failed)."""
    try:
        response = client.post("/v1/generations", json=request_body(photo_url, width, height, steps, seed, guidance))
    except Exception as error:  # noqa: BLE001 - a transport failure is a failed request, counted
        return None, f"{type(error).__name__}: {error}"
    if response.status_code != 200:
        return None, f"{response.status_code} {response.text[:200]}"
    return float(response.json().get("batch_size", 1)), None


def closed_loop_capacity(client, photo_url: str, *, width: int, height: int, steps_mix: list[int], guidance: float,
                         clients: int, requests: int) -> float:
    """Images/s with ``clients`` clients each sending its next request when the last is
    answered, ``requests`` in all."""
    seeds = iter(range(10**6, 2 * 10**6))
    lock = threading.Lock()
    left = [requests]

    def one_client(index: int) -> None:
        turn = index
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
                seed = next(seeds)
            _, error = _send(client, photo_url, width, height, steps_mix[turn % len(steps_mix)], seed, guidance)
            if error:
                raise RuntimeError(f"capacity run: a request failed: {error}")
            turn += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return requests / (time.perf_counter() - started)


def open_loop(client, photo_url: str, schedule: list[tuple[float, int]], *, width: int, height: int,
              guidance: float) -> dict:
    """Send ``schedule`` (each request at its second, whatever the others are doing)."""
    latencies: list[float] = []
    batches: list[float] = []
    failures: list[str] = []
    finished: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.2  # every sender thread is up before the first arrival

    def one(index: int) -> None:
        at, steps = schedule[index]
        time.sleep(max(0.0, start + at - time.perf_counter()))
        batch, error = _send(client, photo_url, width, height, steps, 5000 + index, guidance)
        done = time.perf_counter()
        with lock:
            if error:
                failures.append(error)
            else:
                latencies.append(done - (start + at))
                batches.append(batch)
                finished.append(done)

    with ThreadPoolExecutor(len(schedule)) as pool:
        list(pool.map(one, range(len(schedule))))
    wall = (max(finished) - start) if finished else float("nan")
    return {"latencies": latencies, "batches": batches, "failures": failures,
            "images_per_s": len(latencies) / wall if finished else 0.0}


def run_load(session: ServeSession, out: Path, *, width: int, height: int, steps_mix: list[int], guidance: float,
             fraction: float, requests: int, max_batch_images: int, capacity_requests: int, seed: int = 0,
             capacity: float | None = None) -> Results:
    import httpx

    if not 0 < fraction <= 2:
        raise ValueError(f"--load must be a fraction of capacity in (0, 2], not {fraction}")
    results = Results(out, "load", LOAD_COLUMNS, repeats=1, warmup=len(steps_mix),
                      optional=("p95_vs_request", "images_per_s_vs_request"),
                      title=f"Open-loop load at {fraction:.0%} of the static path's capacity: "
                            "static (request) vs step-level batching",
                      table=("batching", "arrival_rate_per_s", "requests", "failed", "images_per_s", "latency_p50_s",
                             "latency_p95_s", "latency_p99_s", "mean_batch_size", "p95_vs_request",
                             "images_per_s_vs_request"))
    photo_url = data_url(synthetic_face())
    shape = {"width": width, "height": height, "guidance": guidance}
    measured: dict[str, dict] = {}
    with httpx.Client(base_url=session.url, timeout=600,
                      limits=httpx.Limits(max_connections=requests + 2 * max_batch_images + 2)) as client:
        for mode in MODES:
            session.deploy(max_batch_images, batching=mode)
            for k, steps in enumerate(steps_mix):  # warm-up: every step count once
                _, error = _send(client, photo_url, width, height, steps, k, guidance)
                if error:
                    raise RuntimeError(f"warm-up ({mode}): {error}")
            if capacity is None:  # measured on the baseline, which runs first
                capacity = closed_loop_capacity(client, photo_url, steps_mix=steps_mix, clients=2 * max_batch_images,
                                                requests=capacity_requests, **shape)
                schedule = poisson_schedule(requests, fraction * capacity, steps_mix, seed)
            elif mode == MODES[0]:
                schedule = poisson_schedule(requests, fraction * capacity, steps_mix, seed)
            measured[mode] = open_loop(client, photo_url, schedule, **shape)
    base = measured[MODES[0]]
    base_p95 = percentile(base["latencies"], 95)
    for mode in MODES:
        m = measured[mode]
        lat = m["latencies"]
        p95 = percentile(lat, 95)
        results.add(case=f"{mode}_{round(fraction * 100)}pct", batching=mode, load_fraction=fraction,
                    capacity_images_per_s=capacity, arrival_rate_per_s=fraction * capacity, requests=requests,
                    answered=len(lat), failed=len(m["failures"]), width=width, height=height,
                    steps_mix="/".join(map(str, steps_mix)), max_batch_images=max_batch_images,
                    images_per_s=m["images_per_s"], latency_p50_s=percentile(lat, 50), latency_p95_s=p95,
                    latency_p99_s=percentile(lat, 99), latency_max_s=max(lat) if lat else None,
                    mean_batch_size=sum(m["batches"]) / len(m["batches"]) if m["batches"] else None,
                    p95_vs_request=p95 / base_p95 if lat and base["latencies"] else None,
                    images_per_s_vs_request=(m["images_per_s"] / base["images_per_s"]
                                             if base["images_per_s"] else None))
    failures = [f"{mode}: {error}" for mode in MODES for error in measured[mode]["failures"][:3]]
    if failures:
        results.footer = "Failed requests (first three per loop): " + "; ".join(failures)
    results.close()
    return results
