"""The one store step, for the served API (the Postprocessor) and ``instantid render``
alike: encode the images, put them under their keys with their content types, then create
the record that marks the result complete.

It is idempotent: keys are fixed by the id and the images of a rerun are the same bytes,
and the record is created atomically (create-if-absent). When an earlier attempt (a
takeover, a retry) already stored the result, its record stands and nothing is logged
twice.
"""

from __future__ import annotations

import io
import secrets
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import Canceled
from .keys import render_log_prefix
from .storage import ObjectNotFound, Storage, json_bytes
from pipeline.provenance import ContentCredentials
from pipeline.watermark import Watermark

# output format -> (PIL format, content type, file extension)
FORMATS = {"png": ("PNG", "image/png", "png"), "jpeg": ("JPEG", "image/jpeg", "jpg"),
           "webp": ("WEBP", "image/webp", "webp")}
CONTENT_TYPES = {ext: content_type for _, content_type, ext in FORMATS.values()} | {"json": "application/json"}


def encode(array: np.ndarray, fmt: str, quality: int) -> bytes:
    pil_format = FORMATS[fmt][0]
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 6}
    if fmt == "jpeg":  # full-resolution colour (4:4:4): halved chroma would erase the invisible watermark
        options["subsampling"] = 0
    Image.fromarray(array).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def encode_marked(array: np.ndarray, fmt: str, quality: int, watermark: Watermark | None,
                  output_id: str) -> tuple[bytes, bool]:
    """The encoded picture, with ``watermark``'s mark naming ``output_id`` when the picture
    is large enough, and whether the mark reads back from the encoded file (a lossy format
    can lose it: WebP keeps half the chroma resolution)."""
    marked = watermark.mark(array, output_id) if watermark is not None else None
    data = encode(array if marked is None else marked, fmt, quality)
    if marked is None:
        return data, False
    reading = watermark.read(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return data, reading.this_service and reading.names(output_id)


def content_type_of(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")


@dataclass
class Stored:
    """What the store step left: the record that stands (``record``), whether this call
    wrote it (``fresh``: False when an earlier attempt had), and the encode/put time."""

    record: dict
    fresh: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


def store_result(storage: Storage, images: list[np.ndarray | None], *, prefix: str, fmt: str, quality: int,
                 record_key: str, record: dict, keys_field: str = "keys", log_renders: str | None = None,
                 tombstone: str | None = None, watermark: Watermark | None = None,
                 output_id: str | None = None, credentials: ContentCredentials | None = None,
                 settings: dict | None = None) -> Stored:
    """Put ``images`` at ``<prefix>/<k>.<ext>``, then create ``record`` (their keys in
    ``keys_field``) at ``record_key`` unless it exists. ``log_renders``: a generation id
    whose render log gets one entry when this call's record is the one that stands.

    ``tombstone``: the key of the result's deleted mark. When it exists before the first
    write, nothing is written; when it appears while this call writes, what it wrote is
    erased again. Either way :class:`~service.errors.Canceled`: a deleted result never
    comes back (a delete marks first and erases after, so one of the two sees the other).

    ``watermark``: each picture large enough carries its mark naming ``output_id``; the
    record's ``watermarked`` says, per image, whether the mark reads back from the file.
    An image given as None (blocked by the safety check) is not stored: ``keys`` lists the
    stored ones, in order.

    ``credentials``: each file carries a signed C2PA manifest stating ``settings`` (with
    the image's index and, from ``record["seeds"]``, its seed); the record's ``c2pa`` says so."""
    started = time.perf_counter()
    if tombstone is not None and storage.exists(tombstone):
        raise Canceled("the generation was deleted")
    try:
        return Stored(storage.get_json(record_key), fresh=False)
    except ObjectNotFound:
        pass
    _, content_type, extension = FORMATS[fmt]
    keys, marked = [], []
    for k, array in enumerate(images):
        if array is None:
            marked.append(False)
            continue
        key = f"{prefix}/{k}.{extension}"
        data, readable = encode_marked(array, fmt, quality, watermark, output_id or prefix)
        if credentials is not None:  # after the mark: the manifest binds the final pixels
            seeds = record.get("seeds") or []
            data = credentials.sign(data, content_type, {**(settings or {}), "index": k,
                                                         **({"seed": seeds[k]} if k < len(seeds) else {})})
        storage.put(key, data, content_type)
        keys.append(key)
        marked.append(readable)
    record = {**record, keys_field: keys}
    if watermark is not None:
        record["watermarked"] = marked
    if credentials is not None:
        record["c2pa"] = True
    written = [*keys, record_key]
    fresh = storage.put_if_absent(record_key, json_bytes(record))
    timings = {"store": round((time.perf_counter() - started) * 1000, 2)}
    if fresh and log_renders is not None:
        written.append(f"{render_log_prefix(log_renders)}/{secrets.token_hex(8)}.json")
        storage.put_json(written[-1], {"at": time.time(), "images": len(keys), "timings_ms": timings})
    if tombstone is not None and storage.exists(tombstone):  # deleted while this was written
        for key in written:
            storage.delete(key)
        raise Canceled("the generation was deleted")
    if not fresh:
        return Stored(storage.get_json(record_key), fresh=False)  # an attempt racing this one won
    return Stored(record, fresh=True, timings_ms=timings)
