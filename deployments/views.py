"""What the API answers: stored records turned into response bodies, with links to the
images (presigned, or signed by the ingress for a local store)."""

from __future__ import annotations

from service.records import FaceRecord, GenerationRecord, JobRecord
from service.storage import Storage

from .api import GenerationResponse, Job


class Views:
    def __init__(self, storage: Storage, url_expiry_s: int, public_url: str | None) -> None:
        self.storage, self.url_expiry_s, self.public_url = storage, url_expiry_s, public_url

    def absolute(self, base_url: str | None, url: str) -> str:
        if "://" in url:
            return url
        base = self.public_url or base_url or ""
        return base.rstrip("/") + url

    def images(self, record: GenerationRecord, base_url: str | None) -> list[dict]:
        """Each image of the generation, in order; one the safety check blocked has no url
        (``keys`` lists the stored images only)."""
        count = len(record.safety) if record.safety else len(record.keys)
        marked = record.watermarked + [False] * (count - len(record.watermarked))
        stored = iter(record.keys)
        views = []
        for k, seed in enumerate(record.seeds[:count]):
            verdict = record.safety[k] if record.safety else None
            key = None if verdict is not None and verdict.action == "blocked" else next(stored)
            url = None if key is None else self.absolute(base_url, self.storage.url(key, self.url_expiry_s))
            views.append({"url": url, "seed": seed, "width": record.width, "height": record.height,
                          "watermarked": marked[k], "c2pa": record.c2pa and key is not None,
                          "safety": verdict.model_dump() if verdict is not None else None})
        return views

    def generation(self, record: GenerationRecord, base_url: str | None, timings: dict | None = None) -> dict:
        return GenerationResponse(id=record.id, images=self.images(record, base_url), face=record.face.public(),
                                  timings_ms=timings or {}, batch_size=record.batch_size).model_dump()

    def job(self, job: JobRecord, result: GenerationRecord | None, base_url: str | None) -> dict:
        """A job as ``GET /v1/generations/{id}`` shows it (with its images once it succeeded)."""
        view = Job(id=job.id, status=job.status, stage=job.stage, progress=job.progress, created_at=job.created_at,
                   updated_at=job.updated_at, error=job.error, timings_ms=job.timings_ms)
        if result is not None and job.status == "succeeded":
            view.images, view.face, view.batch_size = self.images(result, base_url), result.face.public(), \
                result.batch_size
        return view.model_dump()

    def finished(self, record: GenerationRecord, base_url: str | None) -> dict:
        """A synchronous generation, shown as a job that succeeded."""
        job = JobRecord(id=record.id, owner=record.owner, status="succeeded", stage="done",
                        created_at=record.created_at, updated_at=record.created_at)
        return self.job(job, record, base_url)

    @staticmethod
    def face(record: FaceRecord) -> dict:
        return {"face_id": record.face_id, "face": record.face.public().model_dump(), "created_at": record.created_at,
                "consent": record.consent.model_dump() if record.consent is not None else None}
