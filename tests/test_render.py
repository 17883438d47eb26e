"""Offline rendering on Ray Data: a 38-row manifest over SeaweedFS, bad rows mixed in,
the job killed midway and run again on a running Ray cluster of its own."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.render import default_seed, parse_manifest, plan_row
from pipeline.provenance import read as read_manifest
from pipeline.watermark import Watermark
from tests.conftest import face_photo, loopback_cluster

INSTANTID = str(Path(sys.executable).parent / "instantid")
# a one-node Ray cluster of its own, not the session's: the module runs in the suite's other
# process (conftest.py), beside the modules on the session's Ray, not among them
pytestmark = pytest.mark.own_ray
KEY_DIGEST = "a" * 64  # the renderer's API key (digest): registered faces must be its own
OWNER = KEY_DIGEST[:16]
SIZE = {"width": 96, "height": 96, "num_inference_steps": 3}  # small: the test is about rows, not pixels
ROWS = 38
WIDE = face_photo(size=(320, 240), blobs=((160, 120, 60),))
WIDE_MASK = Image.new("L", (320, 240), 0)
WIDE_MASK.paste(255, (90, 50, 230, 190))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- manifests


def test_jsonl_csv_and_parquet_manifests_give_the_same_jobs():
    rows = [{"id": "a", "face_images": ["s3://b/1.png", "s3://b/2.png"], "prompt": "x", "seed": 3, "width": 64,
             "height": 64}]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    csv = b"id,face_images,prompt,seed,width,height\na,s3://b/1.png;s3://b/2.png,x,3,64,64\n"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    jobs = [plan_row(raw) for uri, data in (("m.jsonl", jsonl), ("m.csv", csv), ("m.parquet", buffer.getvalue()))
            for raw in parse_manifest(uri, data)]
    assert all(job["status"] == "pending" for job in jobs)
    assert len({(j["id"], j["face_refs"], j["spec"]) for j in jobs}) == 1
    assert json.loads(jobs[0]["face_refs"]) == ["s3://b/1.png", "s3://b/2.png"]


@pytest.mark.parametrize(
    "raw,message",
    [({"_row": 0, "_error": "the line is not valid JSON"}, "not valid JSON"),
     ({"_row": 1, "id": "../escape", "face_images": ["x"]}, "must be 1-128"),
     ({"_row": 2, "id": "a"}, "face_images or face_id"),
     ({"_row": 3, "id": "a", "face_images": ["x"], "width": 100}, "width: must be a multiple of 8"),
     ({"_row": 4, "id": "a", "face_images": ["x"], "style": "Baroque"}, "style"),
     ({"_row": 5, "id": "a", "face_images": ["x"], "output_format": "gif"}, "output_format"),
     ({"_row": 6, "id": "a", "face_images": ["x"], "prompt": "(a:1.2.3)", "prompt_weighting": "true"},
      "prompt: the weight '1.2.3'"),
     ({"_row": 7, "id": "a", "face_images": ["x"], "controlnets": '[{"type": "canny"}]'}, "controlnets[0].image"),
     ({"_row": 8, "id": "a", "face_images": ["x"], "controlnets": '[{"type": "canny", "image": "x", "scale": 5}]'},
      "controlnets[0].scale: Input should be less than or equal to 2"),
     ({"_row": 9, "id": "a", "face_images": ["x"], "mask_image": "m.png"}, "mask_image: needs image")],
)
def test_bad_rows_become_errors_with_their_reason(raw, message):
    job = plan_row(raw)
    assert job["status"] == "error" and message in job["message"]


def test_rows_without_a_seed_get_one_from_their_id():
    one = plan_row({"_row": 0, "id": "photo-1", "face_images": ["x"]})
    assert json.loads(one["spec"])["seed"] == default_seed("photo-1")
    assert default_seed("photo-1") != default_seed("photo-2") and 0 <= default_seed("photo-1") < 2**63


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def batch(s3_server, face):
    """20 good rows (two registered faces among them), 13 bad ones, one broken line."""
    import time as clock

    from deployments.auth import owner_of
    from service.records import FaceRecord, StoredFace
    from service.storage import open_storage

    client = s3_server.client()
    client.create_bucket(Bucket="batch")
    photos = {
        "faces/round.png": png(face_photo()),
        "faces/warm.png": png(face_photo(color=(255, 230, 190))),
        "faces/wide.png": png(WIDE),
        "faces/black.png": png(Image.new("RGB", (200, 200))),
        "faces/notes.png": b"meeting notes, not a picture",
        "faces/cut.png": png(face_photo())[:300],
        "faces/wide-mask.png": png(WIDE_MASK),
    }
    for key, data in photos.items():
        client.put_object(Bucket="batch", Key=key, Body=data)
    # the service's store of registered faces: the renderer's key's own, another key's, an expired one
    os.environ.update(s3_server.env())  # as the session's Ray has them: this process reads the store too
    store = open_storage("s3://batch/service", endpoint_url=s3_server.endpoint)
    now = clock.time()
    faces = {"mine": (OWNER, now + 3600), "theirs": (owner_of("b" * 64), now + 3600), "old": (OWNER, now - 1)}
    for name, (owner, expires) in faces.items():
        face_id = f"f_{name:_<22}"
        store.put_json(f"faces/{face_id}.json", FaceRecord(face_id=face_id, owner=owner, expires_at=expires,
                                                           face=StoredFace.of(face)).model_dump(mode="json"))
    good = []
    for i in range(20):
        row = {"id": f"good-{i:02d}", "face_images": [f"s3://batch/faces/{('round', 'warm', 'wide')[i % 3]}.png"],
               "prompt": f"portrait {i}", **SIZE}
        if i % 5 == 0:
            row["num_images"] = 2
        if i % 4 == 0:
            row["seed"] = 1000 + i
        if i % 6 == 0:
            row["style"] = "Neon"
        if i % 7 == 0:
            row["output_format"] = "jpeg"
        if i in (3, 11):  # a registered face instead of photos
            row["face_id"] = "f_mine" + "_" * 18
            del row["face_images"]
        if i == 11:  # img2img of a registered face, in the picture's head pose
            row.update(image="s3://batch/faces/wide.png", strength=0.5)
        if i == 13:  # an extra ControlNet, its control image made from a photo
            row["controlnets"] = [{"type": "canny", "image": "s3://batch/faces/wide.png", "scale": 0.8}]
        if i == 1:  # large enough to carry the invisible watermark (the others are too small to)
            row.update(width=256, height=256, num_inference_steps=1)
        if i == 8:  # inpainting
            row.update(image="s3://batch/faces/wide.png", mask_image="s3://batch/faces/wide-mask.png")
        good.append(row)
    bad = {
        "noface-1": ("no_face", {"face_images": ["s3://batch/faces/black.png"]}),
        "noface-2": ("no_face", {"face_images": ["s3://batch/faces/black.png", "s3://batch/faces/round.png"]}),
        "notimage": ("bad_image", {"face_images": ["s3://batch/faces/notes.png"]}),
        "truncated": ("bad_image", {"face_images": ["s3://batch/faces/cut.png"]}),
        "missing": ("bad_image", {"face_images": ["s3://batch/faces/nobody.png"]}),
        "oddsize": ("error", {"face_images": ["s3://batch/faces/round.png"], "width": 100}),
        "nostyle": ("error", {"face_images": ["s3://batch/faces/round.png"], "style": "Baroque"}),
        "noface-field": ("error", {"prompt": "who?"}),
        "toomany": ("error", {"face_images": ["s3://batch/faces/round.png"], "num_images": 99}),
        "theirface": ("error", {"face_id": "f_theirs" + "_" * 16}),  # another key's face: as the API refuses it
        "oldface": ("error", {"face_id": "f_old" + "_" * 19}),  # past its retention
        "noface-id": ("error", {"face_id": "f_nobody" + "_" * 16}),
        "badface-id": ("error", {"face_id": "../faces/f_mine"}),
        "badmask": ("bad_image", {"face_images": ["s3://batch/faces/round.png"], "image": "s3://batch/faces/wide.png",
                                  "mask_image": "s3://batch/faces/notes.png"}),
        "nocontrolnet": ("error", {"face_images": ["s3://batch/faces/round.png"],
                                   "controlnets": [{"type": "sketch", "image": "s3://batch/faces/wide.png"}]}),
        "controlnoimage": ("error", {"face_images": ["s3://batch/faces/round.png"],
                                     "controlnets": [{"type": "canny"}]}),
        "masknoimage": ("error", {"face_images": ["s3://batch/faces/round.png"],
                                  "mask_image": "s3://batch/faces/wide-mask.png"}),
    }
    lines = [json.dumps(row) for row in good]
    for name, (_, fields) in bad.items():
        lines.append(json.dumps({"id": name, "width": 64, "height": 64, "num_inference_steps": 2, **fields}))
    lines.insert(13, "{this line is broken")  # row 13: not JSON at all
    assert len(lines) == ROWS
    client.put_object(Bucket="batch", Key="manifests/m.jsonl", Body="\n".join(lines).encode())
    expected = {row["id"]: "ok" for row in good} | {name: status for name, (status, _) in bad.items()}
    expected["row-13"] = "error"
    return {"manifest": "s3://batch/manifests/m.jsonl", "good": {r["id"]: r for r in good}, "expected": expected}


@pytest.fixture(scope="module")
def render_cluster(s3_server):
    """A one-node Ray cluster (a head alone), started as `ray start --head` would; yields its
    address."""
    with loopback_cluster(s3_server, num_cpus=4, num_gpus=0, object_store_memory=100 * 1024 * 1024,
                          include_dashboard=False) as cluster:
        yield cluster.address


def markers(client) -> dict[str, str]:
    listed = client.list_objects_v2(Bucket="batch", Prefix="out/rows/")
    found = {}
    for item in listed.get("Contents", []):
        name = item["Key"].rsplit("/", 1)[1].removesuffix(".json")
        row_id, _, status = name.rpartition(".")
        found.setdefault(row_id, [])
        found[row_id].append(status)
    return found


FINISHED = {"ok", "no_face", "bad_image"}  # the final statuses (an error is tried again)


def finishing_runs(client) -> dict[str, str]:
    """Row id -> the run that finished it, as its marker says (a final marker is written once)."""
    runs = {}
    for row_id, statuses in markers(client).items():
        for status in set(statuses) & FINISHED:
            body = client.get_object(Bucket="batch", Key=f"out/rows/{row_id}.{status}.json")["Body"].read()
            runs[row_id] = json.loads(body)["run"]
    return runs


def render_command(weights_dir, batch) -> list[str]:
    return [INSTANTID, "render", batch["manifest"], "--weights", str(weights_dir), "--out", "s3://batch/out",
            "--batch-images", "4", "--no-progress", "--face-store", "s3://batch/service", "--api-key-sha256",
            KEY_DIGEST]


def test_killed_midway_then_resumed_renders_every_good_row_once_and_reports_every_bad_row(
        weights_dir, s3_server, batch, tmp_path, render_cluster):
    """The job is submitted to a running Ray cluster (RAY_ADDRESS, as `ray job submit` does):
    killing its driver ends its job (its workers later, not at once); the cluster stays. Over
    60 s: two runs of a Ray Data job (actor pools started twice), the one end-to-end run of
    `instantid render`."""
    import psutil

    client = s3_server.client()
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp,
           "RAY_ADDRESS": render_cluster}
    try:
        # run 1: killed (SIGKILL, no chance to clean up) once a few rows are done
        first = subprocess.Popen(render_command(weights_dir, batch), stdout=subprocess.PIPE,
                                 stderr=open(tmp_path / "run1.log", "wb"), env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while sum("ok" in s for s in markers(client).values()) < 4:
            assert first.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "run 1 finished no row in time"
            time.sleep(0.1)
        family = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        os.killpg(first.pid, signal.SIGKILL)
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        first.wait(timeout=60)
        after_kill = markers(client)
        finished_in_run1 = {rid for rid, statuses in after_kill.items() if set(statuses) & FINISHED}
        assert 4 <= len([r for r in finished_in_run1 if r.startswith("good")]) < 20  # really midway
        run1_reports = {rid: json.loads(client.get_object(Bucket="batch", Key=f"out/rows/{rid}.ok.json")["Body"]
                                        .read()) for rid in finished_in_run1 if "ok" in after_kill[rid]}

        # run 2: the same command, to the end
        second = subprocess.run(render_command(weights_dir, batch), capture_output=True, text=True, env=env,
                                timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        summary = json.loads(second.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert summary["rows"] == ROWS
    # Ray ends a killed driver's workers late (some were alive minutes later): a row of run 1
    # may still finish after the kill. Run 2 skips what is finished when it looks; nothing
    # finished is rendered again, and each row keeps the run that finished it first.
    [run1] = {report["run"] for report in run1_reports.values()}
    by_run1 = {rid for rid, run in finishing_runs(client).items() if run == run1}
    assert finished_in_run1 <= by_run1
    assert len(finished_in_run1) <= summary["skipped_finished"] <= len(by_run1)
    assert summary["processed"] == ROWS - summary["skipped_finished"]
    assert summary["statuses"] == {"ok": 20, "no_face": 2, "bad_image": 4, "error": 12}

    table = pq.read_table(io.BytesIO(client.get_object(Bucket="batch", Key="out/results.parquet")["Body"].read()))
    results = {row["id"]: row for row in table.to_pylist()}
    assert table.num_rows == ROWS and set(results) == set(batch["expected"])
    assert {rid: row["status"] for rid, row in results.items()} == batch["expected"]
    final = markers(client)
    for row_id, spec in batch["good"].items():
        assert final[row_id] == ["ok"], (row_id, final[row_id])  # exactly one, final marker
        report = results[row_id]
        assert len(report["images"]) == spec.get("num_images", 1) == len(report["seeds"])
        if "seed" in spec:
            assert report["seeds"][0] == spec["seed"]
        marker = json.loads(client.get_object(Bucket="batch", Key=f"out/rows/{row_id}.ok.json")["Body"].read())
        assert marker["watermarked"] == [spec["width"] == 256] * len(report["images"]) and marker["c2pa"] is True
        for k, key in enumerate(report["images"]):
            data = client.get_object(Bucket="batch", Key=f"out/{key}")["Body"].read()
            manifest = read_manifest(data, "image/jpeg" if spec.get("output_format") == "jpeg" else "image/png")
            assert manifest.valid and manifest.created_by_algorithm, manifest.errors  # signed with the env's chain
            assert {f: manifest.generation[f] for f in ("row_id", "index", "seed")} == {
                "row_id": row_id, "index": k, "seed": report["seeds"][k]}
            image = Image.open(io.BytesIO(data))
            assert image.size == (spec["width"], spec["height"])
            assert image.format == ("JPEG" if spec.get("output_format") == "jpeg" else "PNG")
            reading = Watermark().read(np.asarray(image.convert("RGB")))
            assert reading.names(row_id) == (spec["width"] == 256)  # the row's id, as its digest
        if "mask_image" in spec:  # the picture's own pixels outside the mask
            from pipeline.img2img import frame_mask, frame_picture

            size = (SIZE["width"], SIZE["height"])
            keep = frame_mask(WIDE_MASK, WIDE_MASK.size, size) == 0
            assert (np.asarray(image.convert("RGB"))[keep] == frame_picture(WIDE, size)[keep]).all()
        if row_id in by_run1:  # rendered in run 1, untouched by run 2
            assert report["run"] == run1 != summary["run"]
        else:
            assert report["run"] == summary["run"]
    for row_id, status in batch["expected"].items():
        if status != "ok":
            assert results[row_id]["message"] and not results[row_id]["images"]
    assert "no face was detected" in results["noface-1"]["message"]
    assert "not valid JSON" in results["row-13"]["message"]
    assert "width" in results["oddsize"]["message"]
    assert "belongs to another API key" in results["theirface"]["message"]
    assert "expired" in results["oldface"]["message"] and "no face" in results["noface-id"]["message"]
    # each use of a registered face is in the service's audit log (a row read in both runs: twice);
    # the faces refused (another key's, expired, unknown) leave no entry
    from service.audit import entries
    from service.storage import open_storage

    uses = [e for e in entries(open_storage("s3://batch/service", endpoint_url=s3_server.endpoint))
            if e["event"] == "face_used"]
    assert {e["row_id"] for e in uses} == {"good-03", "good-11"} and len(uses) <= 4
    assert all(e["face_id"] == "f_mine" + "_" * 18 and e["owner"] == OWNER for e in uses)


def test_render_refuses_to_start_without_c2pa_credentials_unless_told(tmp_path, capsys, monkeypatch):
    """Every image of a render is signed as the service's are: without credentials in the
    env the command stops before Ray starts, naming the way out."""
    from deployments.cli import main

    monkeypatch.delenv("INSTANTID_C2PA_KEY")
    assert main(["render", str(tmp_path / "m.jsonl"), "--weights", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "--no-c2pa: set the env vars INSTANTID_C2PA_KEY and INSTANTID_C2PA_CERT" in error
    assert "pass --no-c2pa" in error
    monkeypatch.setenv("INSTANTID_C2PA_KEY", "not a key")
    assert main(["render", str(tmp_path / "m.jsonl"), "--weights", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "signing key: not a readable PEM private key" in capsys.readouterr().err
