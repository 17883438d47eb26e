"""Cold start: seconds from starting ``instantid serve`` (a fresh process: a new local Ray,
the production app, every stage loading its weights) to the first 200 of a generation.

Also recorded: when the server printed its ready line, and how long a clean stop (SIGINT,
as Ctrl-C) took. The server gets a Ray temp dir of its own (``RAY_TMPDIR``), so it never
joins another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Results, summarize
from .images import data_url, synthetic_face
from .serving import free_port, request_body

COLUMNS = ("width", "height", "steps", "ready_median_s", "first_200_median_s", "first_200_min_s",
           "first_200_max_s", "first_200_spread_pct", "shutdown_median_s")


def instantid_command() -> list[str]:
    script = Path(sys.executable).parent / "instantid"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deployments.cli"]


def one_cold_start(weights: str, workdir: Path, *, width: int, height: int, steps: int,
                   timeout_s: float = 600) -> dict[str, float]:
    import httpx

    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(workdir / f"serve-{port}.log", "wb")
    command = [*instantid_command(), "serve", "--weights", weights, "--port", str(port), "--storage",
               str(workdir / "storage")]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"instantid serve exited ({server.wait()}); see {log.name}")
        ready = time.perf_counter() - started
        url = json.loads(line)["url"]
        body = request_body(data_url(synthetic_face()), width, height, steps, seed=1, guidance=5.0)
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            while True:
                try:
                    response = client.post("/v1/generations", json=body)
                    if response.status_code == 200:
                        break
                    if response.status_code not in (503, 502, 404):
                        raise RuntimeError(f"generation failed: {response.status_code} {response.text[:300]}")
                except httpx.TransportError:
                    pass
                if time.perf_counter() - started > timeout_s:
                    raise TimeoutError(f"no 200 within {timeout_s} s")
                time.sleep(0.2)
        first_200 = time.perf_counter() - started
        stopping = time.perf_counter()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        return {"ready": ready, "first_200": first_200, "shutdown": time.perf_counter() - stopping}
    finally:
        if server.poll() is None:  # only the process group this benchmark started
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_coldstart(weights: str, out: Path, workdir: Path, *, width: int, height: int, steps: int,
                  repeats: int) -> Results:
    results = Results(out, "coldstart", COLUMNS, repeats=repeats, warmup=0,
                      title="Cold start: `instantid serve` to the first 200 of a generation",
                      table=("width", "height", "steps", "ready_median_s", "first_200_median_s",
                             "first_200_spread_pct", "shutdown_median_s"))
    runs = [one_cold_start(weights, workdir, width=width, height=height, steps=steps) for _ in range(repeats)]
    first = summarize([r["first_200"] for r in runs])
    results.add(case="instantid_serve", width=width, height=height, steps=steps,
                ready_median_s=summarize([r["ready"] for r in runs])["median"], first_200_median_s=first["median"],
                first_200_min_s=first["min"], first_200_max_s=first["max"],
                first_200_spread_pct=first["spread_pct"],
                shutdown_median_s=summarize([r["shutdown"] for r in runs])["median"])
    results.close()
    return results
