"""`make demo` = `instantid serve` with an API key + one real HTTP generation + a clean
Ctrl-C stop: the one end-to-end run of both commands (the session's Ray, started by the same
`init_loopback_ray`, is checked for loopback-only listeners in test_serving)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_demo_serves_a_generation_and_stops_cleanly(tmp_path, weights_dir):
    """Over 60 s: `make demo`'s script end to end, its own `instantid serve` (a Ray and the
    whole app) started and stopped. The session's fixture weights save it writing its own."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    try:
        proc = run_demo(tmp_path, env, weights_dir)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    image = Image.open(report["image"])
    assert image.size == (64, 64) and image.format == "PNG"
    assert report["url"].startswith("http://127.0.0.1:") and "/v1/files/generations/" in report["url"]
    assert report["web_page"].startswith("http://127.0.0.1:") and report["web_page"].endswith("/")
    assert report["without_key"] == 401 and report["tampered_link"] == 403 and report["api_key"]
    assert "server stopped (exit code 0)" in proc.stderr
    # the local store holds the image and the generation's record
    stored = sorted(p.relative_to(tmp_path / "out" / "storage").as_posix()
                    for p in (tmp_path / "out" / "storage").rglob("*") if p.is_file())
    prefix = f"generations/{report['id']}"
    renders = [key for key in stored if key.startswith(f"{prefix}/renders/")]
    assert len(renders) == 1  # rendered once
    assert sorted(set(stored) - set(renders)) == [f"{prefix}/0.png", f"{prefix}/record.json"]


def run_demo(tmp_path, env, weights_dir):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path / "out"), "--steps", "2",
         "--size", "64", "--weights", str(weights_dir)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
