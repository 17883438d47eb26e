"""`make demo`'s script end to end, run as `python -m bench coldstart` runs it: `instantid
serve` with an API key (its digest in $INSTANTID_API_KEY_SHA256) from nothing (its own Ray
and the whole app), one real HTTP generation, a clean Ctrl-C stop, and the cold start's
timings from it. The one end-to-end run of the demo, of `instantid serve` and of that kind of
cold start (the session's Ray, started by the same `init_loopback_ray`, is checked for
loopback-only listeners in test_serving; the scale-from-zero kind runs in
test_scale_to_zero, on the session's Ray)."""

import json

from PIL import Image

from tests.test_bench import bench, rows


def test_demo_serves_a_generation_stops_cleanly_and_times_its_cold_start(tmp_path, weights_dir):
    """Over 60 s: a Ray and the whole app started from nothing and stopped. The session's
    fixture weights save the demo writing its own."""
    from bench.coldstart import COLUMNS

    bench("coldstart", "--smallest", "--coldstart-kinds", "serve", "--weights", str(weights_dir),
          "--out", str(tmp_path), timeout=900)
    assert not (tmp_path / "scale_from_zero.csv").exists()  # the kind not asked for
    [record] = rows(tmp_path / "coldstart.csv", COLUMNS, required=COLUMNS)
    assert float(record["first_200_median_s"]) >= float(record["ready_median_s"]) > 0
    assert float(record["shutdown_median_s"]) > 0

    run = tmp_path / "coldstart-runs" / "0"
    report = json.loads((run / "report.json").read_text())
    assert report["server_exit_code"] == 0  # stopped cleanly by SIGINT, as Ctrl-C stops it
    assert report["first_200_s"] == float(record["first_200_median_s"])  # one run: its own timing
    image = Image.open(report["image"])
    assert image.size == (64, 64) and image.format == "PNG"
    assert report["url"].startswith("http://127.0.0.1:") and "/v1/files/generations/" in report["url"]
    assert report["web_page"].startswith("http://127.0.0.1:") and report["web_page"].endswith("/")
    assert report["without_key"] == 401 and report["tampered_link"] == 403 and report["api_key"]
    assert report["foreign_host"] == 400  # the loopback server answers to loopback names only
    assert "server stopped (exit code 0)" in (run / "demo.log").read_text()
    # the local store holds the image and the generation's record
    stored = sorted(p.relative_to(run / "storage").as_posix() for p in (run / "storage").rglob("*") if p.is_file())
    prefix = f"generations/{report['id']}"
    renders = [key for key in stored if key.startswith(f"{prefix}/renders/")]
    assert len(renders) == 1  # rendered once
    assert sorted(set(stored) - set(renders)) == [f"{prefix}/0.png", f"{prefix}/record.json"]
