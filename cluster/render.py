"""Offline mass rendering on Ray Data: ``instantid render MANIFEST --weights W --out DIR|s3://...``.

One manifest row (JSONL, CSV or Parquet; local or ``s3://``) is one job: ``id``, the face
(``face_images`` URIs or a registered ``face_id``), ``prompt``, ``style``, ``seed``, size and
the other generation fields. The pipeline:

    rows -> face stage (actor pool; fractional GPUs in production)
         -> diffusion stage (actor pool; whole GPUs; compatible rows batched)
         -> encode + upload (tasks) -> results table

Every row ends with one status: ``ok``, ``no_face``, ``bad_image`` or ``error`` (+ message);
a bad row never stops the job. Each finished row gets a marker ``rows/<id>.<status>.json``
(written atomically, once) next to its images ``images/<id>/<k>.<ext>``; running the same
command again renders only rows without a final marker (``error`` rows are retried).
``results/part-<run>.parquet`` holds each run's rows and ``results.parquet`` all rows.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import secrets
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.errors import ImageTooLarge, InvalidImage, NoFaceDetected
from pipeline.face import with_layout
from pipeline.images import ImageLimits, load_image
from pipeline.params import GenerationParams, invalid_parameter_from, seed_from
from pipeline.s3 import S3Location, s3_client
from pipeline.provenance import settings_of
from pipeline.watermark import Watermark
from service.batching import RenderRequest, render_requests
from service.errors import public_error
from service.audit import audit
from service.lookup import load_face
from service.storage import open_storage
from service.config import ProvenanceConfig
from service.store import FORMATS, store_result

FINAL = ("ok", "no_face", "bad_image")  # a rerun does not touch these; "error" rows are retried
ROW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # matched whole
MARKER = re.compile(r"rows/(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*)\.(?P<status>ok|no_face|bad_image|error)\.json")


# ----------------------------------------------------------------------------- manifest


def read_bytes(uri: str, *, max_bytes: int | None = None, s3=None) -> bytes:
    """Bytes of a local path or an ``s3://`` object (optionally capped)."""
    if uri.startswith("s3://"):
        where = S3Location.parse(uri, field="uri")
        client = s3 or s3_client()
        if max_bytes is not None:
            size = client.head_object(Bucket=where.bucket, Key=where.prefix)["ContentLength"]
            if size > max_bytes:
                raise ImageTooLarge(f"{uri} is {size} bytes, over {max_bytes}", "face_images")
        return client.get_object(Bucket=where.bucket, Key=where.prefix)["Body"].read()
    path = Path(uri).expanduser()
    if max_bytes is not None and path.is_file() and path.stat().st_size > max_bytes:
        raise ImageTooLarge(f"{uri} is over {max_bytes} bytes", "face_images")
    return path.read_bytes()


def parse_manifest(uri: str, data: bytes) -> list[dict]:
    """Raw rows, each with ``_row`` (its position); a line that does not parse becomes a
    row carrying ``_error``."""
    name = uri.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return [{**row, "_row": i} for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist())]
    text = data.decode("utf-8-sig", errors="replace")
    if name.endswith(".csv"):
        return [{**{k: v for k, v in row.items() if k is not None and v not in ("", None)}, "_row": i}
                for i, row in enumerate(csv.DictReader(io.StringIO(text)))]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        rows = []
        for i, line in enumerate(line for line in text.splitlines() if line.strip()):
            try:
                value = json.loads(line)
                rows.append({**value, "_row": i} if isinstance(value, dict) else
                            {"_row": i, "_error": "the line is not a JSON object"})
            except json.JSONDecodeError as error:
                rows.append({"_row": i, "_error": f"the line is not valid JSON ({error.msg})"})
        return rows
    raise ValueError(f"unknown manifest format {uri!r}: use .jsonl, .csv or .parquet")


def _listish(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return [part.strip() for part in text.split(";") if part.strip()]


def default_seed(row_id: str) -> int:
    """A row without a seed gets one from its id: reruns make the same images."""
    return seed_from(row_id)


def plan_row(raw: dict) -> dict:
    """Normalise one raw row into the job the stages carry (all JSON-friendly)."""
    row_id = str(raw.get("id", f"row-{raw['_row']}")).strip()
    # flat columns only (strings, numbers, bytes): lists travel as JSON text
    job = {"id": row_id, "row": int(raw["_row"]), "status": "pending", "message": "", "face_refs": "[]",
           "face_id": "", "pose_ref": "", "image_ref": "", "mask_ref": "", "image": b"", "mask": b"", "control_refs": "[]", "controls": "[]",
           "spec": "", "output_format": "png", "quality": 90, "face": "",
           "pixels": b"", "count": 0, "seeds": "[]", "width": 0, "height": 0}
    if not ROW_ID.fullmatch(row_id):
        job["id"] = f"row-{raw['_row']}"
        return {**job, "status": "error", "message": f"id {row_id!r} must be 1-128 letters, digits, '_', '-', '.'"}
    if "_error" in raw:
        return {**job, "status": "error", "message": raw["_error"]}
    try:
        refs = _listish(raw.get("face_images"))
        face_id = str(raw.get("face_id") or "")
        if bool(refs) == bool(face_id):
            return {**job, "status": "error", "message": "face_images: give face_images or face_id (exactly one)"}
        job["output_format"] = str(raw.get("output_format") or "png")
        job["quality"] = int(raw.get("quality") or 90)
        if job["output_format"] not in FORMATS:
            return {**job, "status": "error", "message": f"output_format: unknown format {job['output_format']!r}"}
        for name in ("mask_image", "strength"):
            if raw.get(name) not in (None, "") and not raw.get("image"):
                return {**job, "status": "error", "message": f"{name}: needs image (the picture to start from)"}
        values = {k: v for k, v in raw.items() if k in GenerationParams.model_fields and v is not None}
        values["controlnets"], control_refs = _controlnets(raw.get("controlnets"))
        values.setdefault("seed", default_seed(row_id))
        spec = GenerationParams(**values)
    except (ValueError, TypeError) as error:
        if hasattr(error, "errors"):
            error = invalid_parameter_from(error)
        return {**job, "status": "error", "message": str(error)}
    return {**job, "face_refs": json.dumps(refs), "face_id": face_id, "pose_ref": str(raw.get("pose_image") or ""),
            "image_ref": str(raw.get("image") or ""), "mask_ref": str(raw.get("mask_image") or ""),
            "control_refs": json.dumps(control_refs), "spec": spec.model_dump_json()}


def _controlnets(value) -> tuple[list[dict], list[str]]:
    """A row's ``controlnets`` (a list, or its JSON text in CSV) -> the entries without
    their images, and the images' URIs."""
    if value in (None, ""):
        return [], []
    entries = json.loads(value) if isinstance(value, str) else list(value)
    params, refs = [], []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("image"):
            raise ValueError(f"controlnets[{k}].image: is required")
        refs.append(str(entry["image"]))
        params.append({key: item for key, item in entry.items() if key != "image"})
    return params, refs


# ----------------------------------------------------------------------------- stages


class FaceStage:
    """Actor: fetches the photos and analyses the face of each pending row."""

    def __init__(self, weights: str, providers: str, cache: str | None, face_store: str | None,
                 face_owner: str | None = None, limits: dict | None = None) -> None:
        from pipeline.face import FaceAnalyzer
        from pipeline.weights import resolve_weights

        paths = resolve_weights(weights, components=("antelopev2",), cache_dir=cache)
        self.analyzer = FaceAnalyzer(paths.antelopev2, providers=providers)
        self.limits = ImageLimits(**(limits or {}))
        self.faces = open_storage(face_store) if face_store else None
        self.face_owner = face_owner
        self.s3 = None

    def _fetch(self, uri: str, field: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if uri.startswith("s3://") and self.s3 is None:
                self.s3 = s3_client()
            return read_bytes(uri, max_bytes=self.limits.max_bytes, s3=self.s3)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise InvalidImage(f"cannot read {uri}", field) from None
        except ClientError as error:
            raise InvalidImage(f"cannot read {uri} ({error.response.get('Error', {}).get('Code', '')})",
                               field) from None
        except BotoCoreError as error:
            raise RuntimeError(f"{field}: S3 unavailable ({error})") from None

    def __call__(self, batch):
        from service.records import StoredFace

        batch = batch.reset_index(drop=True)
        for i in range(len(batch)):
            if batch.at[i, "status"] != "pending":
                continue
            try:
                # img2img/inpainting: the picture (and the head pose, unless pose_image) and its mask
                for column, ref, field in (("image", "image_ref", "image"), ("mask", "mask_ref", "mask_image")):
                    if batch.at[i, ref]:
                        data = self._fetch(batch.at[i, ref], field)
                        load_image(data, field=field, limits=self.limits)  # a bad picture is this row's bad_image
                        batch.at[i, column] = data
                controls = []
                for k, ref in enumerate(json.loads(batch.at[i, "control_refs"])):
                    data = self._fetch(ref, f"controlnets[{k}].image")
                    load_image(data, field=f"controlnets[{k}].image", limits=self.limits)
                    controls.append(base64.b64encode(data).decode("ascii"))
                batch.at[i, "controls"] = json.dumps(controls)
                layout, layout_name = (batch.at[i, "pose_ref"], "pose_image") if batch.at[i, "pose_ref"] else \
                    (batch.at[i, "image_ref"], "image")
                if batch.at[i, "face_id"]:
                    if self.faces is None or self.face_owner is None:
                        raise ValueError("face_id needs --face-store (the service's storage) and --api-key-sha256 "
                                         "(the key the face was registered with)")
                    # the API's rules: the key's own, unexpired faces only
                    face = load_face(self.faces, batch.at[i, "face_id"], self.face_owner).face.to_info()
                    audit(self.faces, "face_used", owner=self.face_owner, face_id=batch.at[i, "face_id"],
                          row_id=batch.at[i, "id"])  # in the service's audit log, as the API's uses are
                    if layout:
                        face = with_layout(face, self.analyzer.analyze(self._fetch(layout, layout_name),
                                                                       field=layout_name))
                else:
                    refs = json.loads(batch.at[i, "face_refs"])
                    names = [f"face_images[{k}]" for k in range(len(refs))]
                    images = [self._fetch(ref, name) for ref, name in zip(refs, names)]
                    pose = self._fetch(layout, layout_name) if layout else None
                    face = self.analyzer.analyze_many(images, pose=pose, names=names, pose_name=layout_name)
                batch.at[i, "face"] = StoredFace.of(face).model_dump_json()
            except NoFaceDetected as error:
                batch.at[i, "status"], batch.at[i, "message"] = "no_face", str(error)
            except (InvalidImage, ImageTooLarge) as error:
                batch.at[i, "status"], batch.at[i, "message"] = "bad_image", str(error)
            except Exception as error:  # noqa: BLE001 - one row's failure never stops the job
                batch.at[i, "status"], batch.at[i, "message"] = "error", _message(error)
        return batch


class DiffusionStage:
    """Actor: renders pending rows, batching rows that share size, steps and scheduler."""

    def __init__(self, weights: str, device: str, dtype: str, cache: str | None) -> None:
        from pipeline import get_pipeline
        from pipeline.weights import resolve_weights

        paths = resolve_weights(weights, components=("sdxl", "instantid"), cache_dir=cache)
        self.pipe = get_pipeline(paths, device=device, dtype=dtype, load_face=False)

    def __call__(self, batch):
        from service.records import StoredFace

        batch = batch.reset_index(drop=True)
        rows = [i for i in range(len(batch)) if batch.at[i, "status"] == "pending"]
        requests = [RenderRequest(batch.at[i, "id"], GenerationParams.model_validate_json(batch.at[i, "spec"]),
                                  StoredFace.model_validate_json(batch.at[i, "face"]).to_info(),
                                  image=bytes(batch.at[i, "image"]) or None, mask=bytes(batch.at[i, "mask"]) or None,
                                  controls=tuple(base64.b64decode(c) for c in json.loads(batch.at[i, "controls"])))
                    for i in rows]
        for i, outcome in zip(rows, render_requests(self.pipe, requests)):
            if isinstance(outcome, BaseException):
                batch.at[i, "status"], batch.at[i, "message"] = "error", _message(outcome)
                continue
            batch.at[i, "pixels"] = b"".join(image.tobytes() for image in outcome.images)
            batch.at[i, "count"] = len(outcome.images)
            batch.at[i, "seeds"] = json.dumps(outcome.seeds)
            batch.at[i, "width"], batch.at[i, "height"] = outcome.width, outcome.height
        return batch


def _message(error: BaseException) -> str:
    """A row's error message: a typed error as the API shows it, anything else by its type."""
    shown = public_error(error)
    return shown.message if shown.code != "internal_error" else f"{type(error).__name__}: {error}"


def upload(batch, out: str, run_id: str, s3_endpoint: str | None, watermark_service: str | None = None,
           c2pa_service: str | None = None):
    """Task: stores each rendered row (:func:`service.store.store_result`: the images, each
    marked with the row's id when large enough and signed (a C2PA manifest, with the
    credentials in this node's env) when ``c2pa_service`` is given, then its ``ok`` marker,
    created once); a failed row gets its ``error`` marker."""
    store = open_storage(out, endpoint_url=s3_endpoint)
    watermark = Watermark(watermark_service) if watermark_service else None
    credentials = ProvenanceConfig().credentials(c2pa_service) if c2pa_service else None
    batch = batch.reset_index(drop=True)
    results = []
    for i in range(len(batch)):
        row = {k: batch.at[i, k] for k in ("id", "row", "status", "message", "width", "height")}
        row = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in row.items()}
        row.update(images=[], seeds=[], run=run_id)
        try:
            if row["status"] == "pending":
                shape = (int(batch.at[i, "count"]), row["height"], row["width"], 3)
                images = list(np.frombuffer(batch.at[i, "pixels"], dtype=np.uint8).reshape(shape))
                row.update(status="ok", seeds=json.loads(batch.at[i, "seeds"]), finished_at=time.time())
                stored = store_result(store, images, prefix=f"images/{row['id']}", fmt=batch.at[i, "output_format"],
                                      quality=int(batch.at[i, "quality"]), record_key=f"rows/{row['id']}.ok.json",
                                      record=row, keys_field="images", watermark=watermark, output_id=row["id"],
                                      credentials=credentials,
                                      settings=settings_of(GenerationParams.model_validate_json(batch.at[i, "spec"]),
                                                           row_id=row["id"], width=row["width"],
                                                           height=row["height"]))
                row = stored.record if stored.fresh else {**row, "status": "duplicate"}
                store.delete(f"rows/{row['id']}.error.json")
        except Exception as error:  # noqa: BLE001
            row.update(status="error", message=f"upload: {type(error).__name__}: {error}", images=[], seeds=[])
        if row["status"] != "duplicate":
            row.setdefault("finished_at", time.time())
            marker = f"rows/{row['id']}.{row['status']}.json"
            if row["status"] in FINAL:
                if row["status"] != "ok" and not store.put_if_absent(marker, json.dumps(row).encode()):
                    row["status"] = "duplicate"  # another run already finished this row: nothing new
            else:
                store.put(marker, json.dumps(row).encode(), "application/json")
        results.append({"id": row["id"], "status": row["status"], "report": json.dumps(row)})
    import pandas as pd

    return pd.DataFrame(results, columns=["id", "status", "report"])


# ----------------------------------------------------------------------------- the job


def finished_rows(store) -> dict[str, str]:
    """Row id -> final status, from the markers (one listing, no reads)."""
    done: dict[str, str] = {}
    for key in store.list_keys("rows"):
        match = MARKER.fullmatch(key)
        if match and match.group("status") in FINAL:
            done[match.group("id")] = match.group("status")
    return done


def reported_ids(store) -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for key in store.list_keys("results"):
        if key.endswith(".parquet"):
            ids |= set(pq.read_table(io.BytesIO(store.get(key)), columns=["id"]).column("id").to_pylist())
    return ids


def _table(rows: list[dict]):
    import pyarrow as pa

    columns = ["id", "row", "status", "message", "width", "height", "images", "seeds", "run", "finished_at"]
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=pa.schema([
        ("id", pa.string()), ("row", pa.int64()), ("status", pa.string()), ("message", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("images", pa.list_(pa.string())),
        ("seeds", pa.list_(pa.int64())), ("run", pa.string()), ("finished_at", pa.float64())]))


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def run(manifest: str, weights: str, out: str, *, face_store: str | None = None, face_owner: str | None = None,
        cache: str | None = None,
        device: str = "auto", dtype: str = "auto", providers: str = "auto", face_gpus: float = 0.0,
        diffusion_gpus: float = 0.0, face_accelerator: str | None = None,
        diffusion_accelerator: str | None = None, face_actors: tuple[int, int] = (1, 1),
        diffusion_actors: tuple[int, int] = (1, 1), batch_images: int = 4, s3_endpoint: str | None = None,
        progress: bool = True, watermark_service: str | None = "instantid", c2pa_service: str | None = None) -> dict:
    """Render every row of ``manifest`` that is not finished yet; return the summary.
    ``watermark_service``: every image large enough carries the invisible mark naming its
    row (None: unmarked). ``c2pa_service``: every image carries a C2PA manifest signed by
    it, with the credentials in $INSTANTID_C2PA_KEY/$INSTANTID_C2PA_CERT (checked here
    first; None: unsigned)."""
    if c2pa_service:
        ProvenanceConfig().credentials(c2pa_service)  # refused now, not in every upload task
    import pandas as pd
    import ray

    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    store = open_storage(out, endpoint_url=s3_endpoint)
    rows = [plan_row(raw) for raw in parse_manifest(manifest, read_bytes(manifest))]
    ids = Counter(row["id"] for row in rows)
    for row in rows:  # duplicate ids would share outputs: both are refused
        if ids[row["id"]] > 1 and row["status"] == "pending":
            row["status"], row["message"] = "error", f"id {row['id']!r} appears {ids[row['id']]} times"
    done = finished_rows(store)
    todo = [row for row in rows if row["id"] not in done]
    # rows a killed run finished after its last results part: re-read their markers
    reported = reported_ids(store)
    recovered = [store.get_json(f"rows/{rid}.{status}.json") for rid, status in done.items()
                 if rid not in reported and rid in ids]

    results: list[dict] = []
    if todo:
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_pandas(pd.DataFrame(todo))
        face_options = {"num_gpus": face_gpus} | ({"accelerator_type": face_accelerator} if face_accelerator else {})
        diffusion_options = {"num_gpus": diffusion_gpus} | (
            {"accelerator_type": diffusion_accelerator} if diffusion_accelerator else {})
        ds = ds.map_batches(FaceStage, batch_format="pandas", batch_size=8, compute=ActorPoolStrategy(
            min_size=face_actors[0], max_size=face_actors[1]),
            fn_constructor_kwargs={"weights": weights, "providers": providers, "cache": cache,
                                   "face_store": face_store, "face_owner": face_owner}, **face_options)
        ds = ds.map_batches(DiffusionStage, batch_format="pandas", batch_size=batch_images,
                            compute=ActorPoolStrategy(min_size=diffusion_actors[0], max_size=diffusion_actors[1]),
                            fn_constructor_kwargs={"weights": weights, "device": device, "dtype": dtype,
                                                   "cache": cache}, **diffusion_options)
        ds = ds.map_batches(upload, batch_format="pandas", batch_size=8, num_cpus=0.5,
                            fn_kwargs={"out": out, "run_id": run_id, "s3_endpoint": s3_endpoint,
                                       "watermark_service": watermark_service, "c2pa_service": c2pa_service})
        bar = _progress(len(todo), progress)
        for result in ds.iter_rows():
            results.append({**json.loads(result["report"]), "status": result["status"]})
            bar.update(1)
        bar.close()

    fresh = [r for r in results if r["status"] != "duplicate"]
    mine = fresh + recovered
    if mine:
        store.put(f"results/part-{run_id}.parquet", _parquet_bytes(_table(mine)), "application/octet-stream")
    table = _consolidate(store)
    store.put("results.parquet", _parquet_bytes(table), "application/octet-stream")

    wall = time.time() - started
    statuses = Counter(table.column("status").to_pylist())
    images = sum(len(r["images"]) for r in fresh if r["status"] == "ok")
    return {
        "run": run_id,
        "rows": len(rows),
        "skipped_finished": len(rows) - len(todo),
        "processed": len(fresh),
        "statuses": {s: statuses.get(s, 0) for s in ("ok", "no_face", "bad_image", "error")},
        "images_this_run": images,
        "images_per_hour": round(images / wall * 3600, 1) if wall > 0 else 0.0,
        "wall_s": round(wall, 2),
        "results": f"{out.rstrip('/')}/results.parquet",
    }


def _consolidate(store):
    """All parts into one table, one row per id (the newest report wins)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    latest: dict[str, dict] = {}
    for key in sorted(store.list_keys("results")):
        if key.endswith(".parquet"):
            for row in pq.read_table(io.BytesIO(store.get(key))).to_pylist():
                if row["id"] not in latest or (row["finished_at"] or 0) >= (latest[row["id"]]["finished_at"] or 0):
                    latest[row["id"]] = row
    table = _table(sorted(latest.values(), key=lambda r: r["row"]))
    return table if table.num_rows else pa.Table.from_pylist([], schema=table.schema)


class _NoBar:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="rows", unit="row", file=sys.stderr, dynamic_ncols=True)
