"""Cold starts, two kinds:

* ``instantid serve`` from nothing: seconds from starting it (a fresh process: a new local
  Ray, the production app, every stage loading its weights) to the first 200 of a generation;
* scale from zero (:func:`run_scale_from_zero`): the app running with its Generator
  autoscaled to no replica (serve_config.yaml's commented option), a generation sent then:
  seconds to its image (Serve starts a replica, which loads its weights and warms up),
  beside a generation on the warm replica.

Each ``instantid serve`` cold start is one run of ``make demo``'s script
(``scripts/demo.py``: the server with an API key, as in production, one generation over
HTTP, a clean stop as Ctrl-C does), which times itself: when the server printed its ready
line, its first 200, and how long the clean stop took. Every run's output (its report,
image, store and logs) is kept in ``OUT/coldstart-runs/N``. The server gets a Ray temp dir
of its own (``RAY_TMPDIR``), so it never joins another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Results, summarize

COLUMNS = ("width", "height", "steps", "ready_median_s", "first_200_median_s", "first_200_min_s",
           "first_200_max_s", "first_200_spread_pct", "shutdown_median_s")
DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def one_cold_start(weights: str, run_dir: Path, *, width: int, height: int, steps: int,
                   timeout_s: float = 900) -> dict:
    """One run of the demo script into ``run_dir``; its report (``report.json``)."""
    if width != height:
        raise ValueError("the demo renders square images: width must equal height")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_dir / "demo.log", "wb") as log:
            proc = subprocess.run([sys.executable, str(DEMO), "--out", str(run_dir), "--weights", weights,
                                   "--size", str(width), "--steps", str(steps)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                  timeout=timeout_s)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if proc.returncode != 0 or report.get("server_exit_code") != 0 or "first_200_s" not in report:
        raise RuntimeError(f"the demo failed (exit {proc.returncode}, server exit {report.get('server_exit_code')});"
                           f" see {run_dir / 'demo.log'} and {run_dir / 'serve.log'}")
    return report


def run_coldstart(weights: str, out: Path, *, width: int, height: int, steps: int,
                  repeats: int) -> Results:
    results = Results(out, "coldstart", COLUMNS, repeats=repeats, warmup=0,
                      title="Cold start: `instantid serve` (make demo's, API key on) to the first 200 of a generation",
                      table=("width", "height", "steps", "ready_median_s", "first_200_median_s",
                             "first_200_spread_pct", "shutdown_median_s"))
    runs = [one_cold_start(weights, out / "coldstart-runs" / str(n), width=width, height=height, steps=steps)
            for n in range(repeats)]
    first = summarize([r["first_200_s"] for r in runs])
    results.add(case="instantid_serve", width=width, height=height, steps=steps,
                ready_median_s=summarize([r["ready_s"] for r in runs])["median"], first_200_median_s=first["median"],
                first_200_min_s=first["min"], first_200_max_s=first["max"],
                first_200_spread_pct=first["spread_pct"],
                shutdown_median_s=summarize([r["shutdown_s"] for r in runs])["median"])
    results.close()
    return results


# ----------------------------------------------------------------------------- scale from zero

ZERO_COLUMNS = ("width", "height", "steps", "cycles", "zero_to_image_median_s", "zero_to_image_min_s",
                "zero_to_image_max_s", "replica_start_median_s", "warm_median_s", "zero_over_warm")


def scale_to_zero(options: dict[str, dict], *, idle_s: float = 1.0) -> dict[str, dict]:
    """Deployment options (by name) with the Generator autoscaled between no replica and
    one: it starts with none and goes ``idle_s`` after the last request; Serve's replicas
    report their load every 10 s, so it goes 10-25 s after its last request here."""
    generator = options["Generator"]
    generator.pop("num_replicas", None)
    generator["autoscaling_config"] = {
        **generator.get("autoscaling_config", {}), "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
        "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": idle_s,
        "downscale_to_zero_delay_s": idle_s, "look_back_period_s": 12}
    return options


def generator_state(client) -> str:
    """The Generator's state as ``/healthz`` reports it (``running``, ``scaled_to_zero``,
    ``starting``); ``unavailable`` when the app says it is not ready."""
    response = client.get("/healthz")
    if response.status_code != 200:
        return "unavailable"
    return {s["stage"]: s["state"] for s in response.json()["stages"]}["generator"]


def wait_for_state(client, state: str, timeout_s: float) -> float:
    """Seconds until the Generator is in ``state`` (RuntimeError after ``timeout_s``)."""
    started = time.monotonic()
    while (seen := generator_state(client)) != state:
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the Generator was not {state} within {timeout_s:.0f} s (it is {seen})")
        time.sleep(0.5)
    return time.monotonic() - started


def run_scale_from_zero(url: str, out: Path, *, width: int, height: int, steps: int, cycles: int,
                        headers: dict | None = None, timeout_s: float = 600) -> Results:
    """On an app whose Generator scales to zero (:func:`scale_to_zero`), ``cycles`` times:
    wait until it has no replica, time a generation (a replica starts, loads its weights,
    warms up, renders), then a second one on the warm replica."""
    import httpx

    from .images import data_url, synthetic_face
    from .serving import request_body

    results = Results(out, "scale_from_zero", ZERO_COLUMNS, repeats=cycles, warmup=0,
                      title="Scale from zero: a generation sent while the Generator has no replica, "
                            "beside one on the warm replica",
                      table=("width", "height", "steps", "cycles", "zero_to_image_median_s", "replica_start_median_s",
                             "warm_median_s", "zero_over_warm"))
    photo = data_url(synthetic_face())
    zero, start, warm = [], [], []
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers or {}) as client:
        for cycle in range(cycles):
            wait_for_state(client, "scaled_to_zero", timeout_s)
            for seed, times in ((2 * cycle, zero), (2 * cycle + 1, warm)):
                started = time.perf_counter()
                response = client.post("/v1/generations", json=request_body(photo, width, height, steps, seed, 5.0))
                times.append(time.perf_counter() - started)
                if response.status_code != 200 or not response.json()["images"]:
                    raise RuntimeError(f"generation failed: {response.status_code} {response.text[:300]}")
                if times is zero:
                    if "starting" not in response.json()["timings_ms"]:
                        raise RuntimeError("the generation sent at zero replicas did not wait for one to start")
                    start.append(response.json()["timings_ms"]["starting"] / 1000)
    zero_s, warm_s = summarize(zero), summarize(warm)
    results.add(case="generator_from_zero", width=width, height=height, steps=steps, cycles=cycles,
                zero_to_image_median_s=zero_s["median"], zero_to_image_min_s=zero_s["min"],
                zero_to_image_max_s=zero_s["max"], replica_start_median_s=summarize(start)["median"],
                warm_median_s=warm_s["median"], zero_over_warm=round(zero_s["median"] / warm_s["median"], 1))
    results.close()
    return results
