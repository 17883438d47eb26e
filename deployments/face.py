"""FaceEmbedder: detection + identity embedding, batched across requests."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from pipeline.errors import InvalidParameter
from pipeline.face import FaceAnalyzer, FaceInfo
from pipeline.images import ImageLimits, load_image
from pipeline.optimize import Optimizations, face_provider_list
from pipeline.weights import resolve_weights

from . import metrics
from .jobs import FaceJob


@serve.deployment(name="FaceEmbedder", max_ongoing_requests=16)
class FaceEmbedder:
    def __init__(self, weights: str, providers: str = "auto", cache: str | None = None,
                 s3_endpoint: str | None = None, limits: dict | None = None, optimizations: str | None = None) -> None:
        speed = Optimizations.parse(optimizations)  # the face stage's part: face_providers, face_batch
        if speed.face_providers != "auto":
            if providers != "auto":
                raise InvalidParameter("face_providers", "give face providers either as face_providers or in "
                                                         "optimizations, not both")
            providers = face_provider_list(speed.face_providers)
        paths = resolve_weights(weights, components=("antelopev2",), cache_dir=cache, s3_endpoint=s3_endpoint)
        self.analyzer = FaceAnalyzer(paths.antelopev2, providers=providers, batch_recognition=speed.face_batch)
        self.limits = ImageLimits(**(limits or {}))

    def reconfigure(self, config: dict) -> None:
        self._embed_batch.set_max_batch_size(int(config.get("max_batch_size", 8)))
        self._embed_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    def ready(self) -> dict:
        return {"stage": "face", "providers": self.analyzer.active_providers}

    async def embed(self, job: FaceJob) -> FaceInfo:
        outcome = await self._embed_batch(job)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, jobs: list[FaceJob]) -> list[FaceInfo | BaseException]:
        return await asyncio.to_thread(lambda: [self._analyze(job) for job in jobs])

    def _analyze(self, job: FaceJob) -> FaceInfo | BaseException:
        started = time.perf_counter()
        try:
            names = job.names or [f"face_images[{i}]" for i in range(len(job.images))]
            images = [load_image(data, field=name, limits=self.limits) for data, name in zip(job.images, names)]
            pose = load_image(job.pose, field="pose_image", limits=self.limits) if job.pose is not None else None
            return self.analyzer.analyze_many(images, pose=pose, combine=job.combine, names=names)
        except Exception as error:  # one bad request must not fail the others in its batch
            return error
        finally:
            metrics.face_latency_ms().observe((time.perf_counter() - started) * 1000)
