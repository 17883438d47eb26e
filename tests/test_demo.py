"""`make demo` = `instantid serve` + one real HTTP generation + a clean Ctrl-C stop."""

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


def test_serve_command_with_keys_listens_on_loopback_only_and_stops_on_ctrl_c(tmp_path, weights_dir):
    """Over 60 s: the one end-to-end run of `instantid serve` with keys (its own Ray and app)."""
    import signal

    import httpx
    import psutil

    from deployments.auth import new_key
    from tests.conftest import data_url, face_photo
    from tests.s3server import free_ports

    key, digest = new_key()
    port = free_ports(1)[0]
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "instantid"), "serve", "--weights", str(weights_dir), "--port", str(port),
         "--storage", str(tmp_path / "storage"), "--api-key-sha256", digest],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        ready = json.loads(server.stdout.readline())
        assert ready["url"] == f"http://127.0.0.1:{port}"
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        pids = {p.pid for p in tree}
        listeners = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert listeners and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listeners), listeners
        body = {"face_images": [data_url(face_photo())], "width": 64, "height": 64, "num_inference_steps": 1}
        assert httpx.post(f"{ready['url']}/v1/generations", json=body, timeout=120).status_code == 401
        ok = httpx.post(f"{ready['url']}/v1/generations", json=body, timeout=120,
                        headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
        image_url = ok.json()["images"][0]["url"]
        assert httpx.get(image_url, timeout=60).status_code == 200
        assert httpx.get(image_url.replace("signature=", "signature=0"), timeout=60).status_code == 403
        os.killpg(server.pid, signal.SIGINT)
        assert server.wait(timeout=120) == 0
        assert not [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
                    and c.laddr.port == port]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
