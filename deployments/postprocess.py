"""Postprocessor: encodes a generation's images, stores them and creates its record, the
generation's completion marker (CPU). The store step itself is :mod:`service.store`,
shared with ``instantid render``."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from service.batching import RenderedImages
from service.config import ProvenanceConfig
from service.keys import deleted_key, generation_prefix, record_key
from service.records import GenerationRecord, OutputSpec, SafetyVerdict
from service.storage import open_storage
from service.store import store_result
from pipeline.safety import SafetyChecker, apply_policy, check_policy
from pipeline.watermark import Watermark

from .messages import StoredGeneration


@serve.deployment(name="Postprocessor", max_ongoing_requests=16)
class Postprocessor:
    def __init__(self, storage: str, s3_endpoint: str | None = None, watermark_service: str | None = None,
                 safety_policy: str = "off", weights: str | None = None, cache: str | None = None,
                 provenance: ProvenanceConfig | None = None, service: str = "instantid") -> None:
        self.storage = open_storage(storage, endpoint_url=s3_endpoint)
        # every output carries a signed C2PA manifest (None: off); the credentials from this node's env
        self.credentials = provenance.credentials(service) if provenance is not None else None
        # every output large enough carries the invisible mark naming its generation (None: off)
        self.watermark = Watermark(watermark_service) if watermark_service else None
        # every output is screened before it is stored ("off": not); the classifier from the weights root
        self.safety_policy = check_policy(safety_policy, "safety.policy") if safety_policy != "off" else None
        self.checker = (SafetyChecker.from_weights(weights, cache_dir=cache, s3_endpoint=s3_endpoint)
                        if self.safety_policy else None)

    def ready(self) -> dict:
        return {"stage": "postprocessor", "storage": repr(self.storage),
                "watermark": self.watermark.service if self.watermark else None, "safety": self.safety_policy,
                "c2pa": self.credentials is not None}

    async def store(self, rendered: RenderedImages, output: OutputSpec, record: GenerationRecord,
                    settings: dict | None = None) -> StoredGeneration:
        """Store once: when an earlier attempt (a retry, a job taken over) already stored
        this generation, its record stands and is returned as ``replayed``. A generation
        deleted meanwhile is not stored (or is erased again): :class:`Canceled`.
        ``settings``: the public generation settings each image's C2PA manifest states."""
        return await asyncio.to_thread(self._store, rendered, output, record, settings or {})

    def _store(self, rendered: RenderedImages, output: OutputSpec, record: GenerationRecord,
               settings: dict) -> StoredGeneration:
        images: list = list(rendered.images)
        update = {"seeds": rendered.seeds, "width": rendered.width, "height": rendered.height,
                  "batch_size": rendered.batch_size}
        timings = dict(rendered.timings_ms)
        if self.checker is not None:  # screened before anything is stored
            started = time.perf_counter()
            kept = apply_policy(images, self.checker.flags(images), self.safety_policy)
            images = [image for image, _ in kept]
            update["safety"] = [SafetyVerdict(**verdict.as_dict()) for _, verdict in kept]
            timings["safety"] = round((time.perf_counter() - started) * 1000, 2)
        record = record.model_copy(update=update)
        stored = store_result(self.storage, images, prefix=generation_prefix(rendered.id), fmt=output.format,
                              quality=output.quality, record_key=record_key(rendered.id),
                              record=record.model_dump(mode="json"), log_renders=rendered.id,
                              tombstone=deleted_key(rendered.id), watermark=self.watermark, output_id=rendered.id,
                              credentials=self.credentials,
                              settings={**settings, "generation_id": rendered.id, "width": rendered.width,
                                        "height": rendered.height})
        return StoredGeneration(GenerationRecord.model_validate(stored.record), replayed=not stored.fresh,
                                timings_ms={**timings, **stored.timings_ms})
