"""`make demo`: fixture weights, `instantid serve` on loopback with an API key (auth on, as
in production), one real HTTP generation from a photo shipped with scikit-image (the
astronaut), then a clean stop.

Prints where the image is (a file and the URL it was served from), the key (for the web
page), that the server refused a request without the key, a tampered link and a request
naming another host (as a DNS-rebinding page's would), and how long
the server took to come up: seconds from starting it to its ready line and to the first 200.
After the stop, ``OUT/report.json`` holds the same report plus the server's exit code and
how long its clean stop took (``python -m bench coldstart`` times cold starts with it)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--weights", type=Path, help="a weights root to serve (default: fixture weights made in --out)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    weights = args.weights.resolve() if args.weights else out / "demo-weights"
    if not (weights / "instantid" / "ip-adapter.bin").is_file():
        subprocess.run([BIN / "instantid", "fixtures", str(weights)], check=True, stdout=subprocess.DEVNULL)

    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    photo = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    from deployments.auth import new_key

    key, digest = new_key()  # auth on, as in production: the server knows only the key's digest
    port = args.port or free_port()
    log = open(out / "serve.log", "wb")
    report: dict = {}
    started = time.perf_counter()
    server = subprocess.Popen(  # the key's digest from the environment, as a deployment passes secrets
        [BIN / "instantid", "serve", "--weights", str(weights), "--port", str(port), "--storage", str(out / "storage")],
        stdout=subprocess.PIPE, stderr=log, start_new_session=True,
        env={**os.environ, "INSTANTID_API_KEY_SHA256": digest},
    )
    try:
        line = server.stdout.readline()  # the server prints one JSON line once it is ready
        if not line:
            print(f"demo: the server did not start; see {out / 'serve.log'}", file=sys.stderr)
            return 1
        ready_s = time.perf_counter() - started
        base = json.loads(line)["url"]
        body = {"face_images": [photo], "prompt": "a portrait of an astronaut", "style": "Watercolor",
                "width": args.size, "height": args.size, "num_inference_steps": args.steps, "seed": 42}
        keyless = httpx.post(f"{base}/v1/generations", json=body, timeout=600).status_code  # refused: 401
        response = httpx.post(f"{base}/v1/generations", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {key}"})
        if response.status_code != 200:
            print(f"demo: generation failed: {response.status_code} {response.text}", file=sys.stderr)
            return 1
        first_200_s = time.perf_counter() - started
        result = response.json()
        url = result["images"][0]["url"]
        image_bytes = httpx.get(url, timeout=60).content
        path = out / "demo.png"
        path.write_bytes(image_bytes)
        Image.open(path).verify()  # decodable
        tampered = httpx.get(url.replace("signature=", "signature=0"), timeout=60).status_code  # refused: 403
        # a page on another site whose name was rebound to 127.0.0.1 sends its own name as Host: refused, 400
        foreign_host = httpx.get(f"{base}/v1/options", headers={"Host": "rebound.example"}, timeout=60).status_code
        report = {"image": str(path), "url": url, "web_page": f"{base}/", "api_docs": f"{base}/docs",
                  "api_key": key, "without_key": keyless, "tampered_link": tampered, "foreign_host": foreign_host,
                  "id": result["id"],
                  "seed": result["images"][0]["seed"], "timings_ms": result["timings_ms"],
                  "ready_s": round(ready_s, 3), "first_200_s": round(first_200_s, 3)}
        print(json.dumps(report), flush=True)
        if sys.stdin.isatty():  # someone is watching: keep the page up until they are done
            print(f"demo: the web page is live at {base}/ (API key: {key}) - press Enter or Ctrl-C to stop",
                  file=sys.stderr, flush=True)
            try:
                input()
            except (KeyboardInterrupt, EOFError):
                pass
        return 0
    finally:
        if server.poll() is None:
            stopping = time.perf_counter()
            os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C does
            try:
                code = server.wait(timeout=90)
                report.update(server_exit_code=code, shutdown_s=round(time.perf_counter() - stopping, 3))
                print(f"demo: server stopped (exit code {code})", file=sys.stderr)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                print("demo: server did not stop in time; killed", file=sys.stderr)
        else:
            report["server_exit_code"] = server.returncode
        log.close()
        if report:
            (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
