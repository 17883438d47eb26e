"""Cold start: seconds from starting ``instantid serve`` (a fresh process: a new local Ray,
the production app, every stage loading its weights) to the first 200 of a generation.

Each cold start is one run of ``make demo``'s script (``scripts/demo.py``: the server with an
API key, as in production, one generation over HTTP, a clean stop as Ctrl-C does), which
times itself: when the server printed its ready line, its first 200, and how long the clean
stop took. Every run's output (its report, image, store and logs) is kept in
``OUT/coldstart-runs/N``. The server gets a Ray temp dir of its own (``RAY_TMPDIR``), so it
never joins another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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
