"""Postprocessor: encodes images (PNG / JPEG / WebP) and stores them (CPU)."""

from __future__ import annotations

import asyncio
import io
import time

from PIL import Image
from ray import serve

from .jobs import OutputSpec, RenderedImages, StoredImages
from .storage import open_storage

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
        _, content_type = FORMATS[spec.format]
        extension = "jpg" if spec.format == "jpeg" else spec.format
        keys, urls = [], []
        for k, array in enumerate(rendered.images):
            key = f"{spec.key_prefix}/{k}.{extension}"
            self.storage.put(key, encode(array, spec.format, spec.quality), content_type)
            keys.append(key)
            urls.append(self.storage.url(key, spec.url_expiry_s))
        timings = {**rendered.timings_ms, "store": round((time.perf_counter() - started) * 1000, 2)}
        return StoredImages(keys, urls, rendered.seeds, rendered.width, rendered.height, rendered.batch_size, timings)
