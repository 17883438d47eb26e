"""FaceEmbedder: detection + identity embedding, batched across requests."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from pipeline.errors import InvalidParameter
from pipeline.face import FaceAnalyzer, FaceInfo, FaceRequest
from pipeline.images import ImageLimits
from pipeline.optimize import Optimizations, face_provider_list
from pipeline.weights import resolve_weights

from . import metrics
from .messages import FaceJob


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
        return await asyncio.to_thread(self._analyze, jobs)

    def _analyze(self, jobs: list[FaceJob]) -> list[FaceInfo | BaseException]:
        """The batch's requests together: detection per photo, one recognition call for
        all their faces; a bad request gets its own error, the others their faces."""
        started = time.perf_counter()
        requests = [FaceRequest(images=job.images, pose=job.pose, combine=job.combine, names=job.names or None,
                                pose_name=job.pose_name)
                    for job in jobs]
        try:
            results: list[FaceInfo | BaseException] = list(self.analyzer.analyze_requests(requests,
                                                                                          limits=self.limits))
        except Exception as error:  # the models themselves failed: no request of the batch has a result
            results = [error] * len(jobs)
        elapsed_ms = (time.perf_counter() - started) * 1000
        for _ in jobs:
            metrics.face_latency_ms().observe(elapsed_ms)
        return results
