"""Postprocessor: encodes images (PNG / JPEG / WebP), stores them, and writes the
generation's record, its completion marker (CPU)."""

from __future__ import annotations

import asyncio
import io
import secrets
import time

from PIL import Image
from ray import serve

from .jobs import OutputSpec, RenderedImages, StoredImages
from .storage import ObjectNotFound, open_storage, record_key

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def encode(array, fmt: str, quality: int) -> bytes:
    pil_format, _ = FORMATS[fmt]
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 6}
    Image.fromarray(array).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


@serve.deployment(name="Postprocessor", max_ongoing_requests=16)
class Postprocessor:
    def __init__(self, storage: str, signing_key: str = "", s3_endpoint: str | None = None,
                 presign_endpoint: str | None = None) -> None:
        self.storage = open_storage(storage, signing_key=signing_key.encode(), endpoint_url=s3_endpoint,
                                    presign_endpoint_url=presign_endpoint)

    def ready(self) -> dict:
        return {"stage": "postprocessor", "storage": repr(self.storage)}

    async def store(self, rendered: RenderedImages, spec: OutputSpec) -> StoredImages:
        return await asyncio.to_thread(self._store, rendered, spec)

    def _store(self, rendered: RenderedImages, spec: OutputSpec) -> StoredImages:
        started = time.perf_counter()
        if spec.record.get("request_hash") is not None:  # an Idempotency-Key: an earlier attempt may
            try:                                          # have completed first, and its result stands
                existing = self.storage.get_json(record_key(rendered.id))
                urls = [self.storage.url(key, spec.url_expiry_s) for key in existing["keys"]]
                return StoredImages(existing, urls, dict(rendered.timings_ms), replayed=True)
            except ObjectNotFound:
                pass
        _, content_type = FORMATS[spec.format]
        extension = "jpg" if spec.format == "jpeg" else spec.format
        keys, urls = [], []
        for k, array in enumerate(rendered.images):
            key = f"{spec.key_prefix}/{k}.{extension}"
            self.storage.put(key, encode(array, spec.format, spec.quality), content_type)
            keys.append(key)
            urls.append(self.storage.url(key, spec.url_expiry_s))
        timings = {**rendered.timings_ms, "store": round((time.perf_counter() - started) * 1000, 2)}
        record = {**spec.record, "id": rendered.id, "created_at": time.time(), "keys": keys, "seeds": rendered.seeds,
                  "width": rendered.width, "height": rendered.height, "batch_size": rendered.batch_size}
        # one log entry per completed render: how often this generation was really rendered
        self.storage.put_json(f"{spec.key_prefix}/renders/{secrets.token_hex(8)}.json",
                              {"at": record["created_at"], "batch_size": rendered.batch_size, "timings_ms": timings})
        self.storage.put_json(record_key(rendered.id), record)  # last: marks the generation complete
        return StoredImages(record, urls, timings)
