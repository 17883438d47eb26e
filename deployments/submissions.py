"""What ``POST /v1/generations`` does besides rendering: the generation's id (one per
``Idempotency-Key``), the face it renders (analysed or registered; several people's:
:mod:`.persons`), handing an async request to the job runners as a durable job, and
finding an earlier attempt's result."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time

from pipeline.errors import InvalidParameter
from pipeline.face import FaceInfo
from pipeline.params import GenerationParams
from service import claims
from service.erasure import record_use
from service.errors import Reported, Timeout
from service.jobs import JobStore
from service.lookup import load_face
from service.records import GenerationRecord, JobInput, JobRecord, OutputSpec, StoredFace, WebhookState

from .api import GenerationRequest
from .flow import GenerationFlow
from .inputs import ImageInputs
from .messages import FaceJob, Pictures
from .persons import People


def generation_id(owner: str, key: str | None, body: GenerationRequest) -> tuple[str, str | None]:
    """A new id, or (with an Idempotency-Key) the one id of this owner's key, and the hash
    of the request that key stands for."""
    if key is None:
        return "g_" + secrets.token_urlsafe(16), None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidParameter("Idempotency-Key", "must be 1 to 255 printable characters")
    digest = hashlib.sha256(f"{owner}\n{key}".encode()).digest()
    return "g_" + base64.urlsafe_b64encode(digest).decode()[:22], \
        hashlib.sha256(body.model_dump_json().encode()).hexdigest()


class Submissions:
    def __init__(self, flow: GenerationFlow, inputs: ImageInputs, jobs: JobStore, runner, results_s: float,
                 claim_s: float) -> None:
        self.flow, self.inputs, self.jobs, self.runner = flow, inputs, jobs, runner
        self.results_s, self.claim_s = results_s, claim_s
        self.people = People(flow, inputs, results_s)
        self._tasks: set[asyncio.Task] = set()

    async def faces(self, body: GenerationRequest, owner: str, deadline: float, pictures: Pictures,
                    generation_id: str) -> tuple[FaceInfo, tuple[FaceInfo, ...]]:
        """The face to render and, with ``people``, each person's face (the first person's
        is the face: the generation's record shows it)."""
        if body.people:
            people = await self.people.faces(body, owner, deadline, generation_id)
            return people[0], people
        return await self.face(body, owner, deadline, pictures, generation_id), ()

    async def face(self, body: GenerationRequest, owner: str, deadline: float, pictures: Pictures,
                   generation_id: str) -> FaceInfo:
        """The face to render: analysed from the photos, or registered (with the head pose
        of ``pose_image``, else of the picture to restyle, when given; the use is recorded)."""
        if body.face_id is None:
            return await self.flow.analyze(await self._face_job(body, owner, pictures), deadline)
        face = await self.flow.registered_face(body.face_id, owner, await self._pose(body, owner, deadline, pictures))
        await asyncio.to_thread(record_use, self.flow.storage, body.face_id, generation_id, owner, self.results_s)
        return face

    async def _face_job(self, body: GenerationRequest, owner: str, pictures: Pictures) -> FaceJob:
        if body.pose_image or pictures.image is None:
            return await self.inputs.face_job(body.face_images, body.pose_image, body.face_combine, owner)
        job = await self.inputs.face_job(body.face_images, None, body.face_combine, owner)
        job.pose, job.pose_name = pictures.image, "image"  # the picture as read once (the render gets the same bytes)
        return job

    async def _pose(self, body: GenerationRequest, owner: str, deadline: float, pictures: Pictures):
        if body.pose_image:
            job = await self.inputs.face_job([body.pose_image], None, "mean", owner)
            job.names = ["pose_image"]
        elif pictures.image is not None:
            job = FaceJob(images=[pictures.image], names=["image"])
        else:
            return None
        posed = await self.flow.analyze(job, deadline)
        return StoredFace.of(posed).public()

    async def pictures(self, body: GenerationRequest, owner: str) -> Pictures:
        """img2img/inpainting: the picture and its mask, read (within the limits)."""
        image = await self.inputs.image_bytes(body.image, "image", owner) if body.image else None
        mask = await self.inputs.image_bytes(body.mask_image, "mask_image", owner) if body.mask_image else None
        controls = [await self.inputs.image_bytes(entry.image, f"controlnets[{k}].image", owner)
                    for k, entry in enumerate(body.controlnets)]
        return Pictures(image, mask, tuple(controls))

    async def start_job(self, generation_id: str, owner: str, body: GenerationRequest, params: GenerationParams,
                        request_hash: str | None, deadline: float) -> JobRecord:
        """Analyse the face (or each person's) now (bad photos are a 4xx at once), store the
        job, and hand it to the job runners. A registered face stays a reference (read when
        the job runs); an analysed one is kept in the job's input until the job ends."""
        pictures = await self.pictures(body, owner)
        job_input = JobInput(params=params, output=OutputSpec(format=body.output_format, quality=body.quality),
                             image=pictures.image, mask_image=pictures.mask, controls=list(pictures.controls))
        if body.people:
            job_input.people = await self.people.inputs_of(body, owner, deadline, generation_id)
        elif body.face_id is not None:
            await asyncio.to_thread(load_face, self.flow.storage, body.face_id, owner, delete_expired=True)  # now
            job_input.face_id, job_input.pose = body.face_id, await self._pose(body, owner, deadline, pictures)
            await asyncio.to_thread(record_use, self.flow.storage, body.face_id, generation_id, owner, self.results_s)
        else:
            job_input.face = StoredFace.of(await self.flow.analyze(await self._face_job(body, owner, pictures),
                                                                   deadline))
        now = time.time()
        record = JobRecord(id=generation_id, owner=owner, created_at=now, updated_at=now,
                           expires_at=now + self.results_s, request_hash=request_hash,
                           webhook=WebhookState(url=body.webhook_url) if body.webhook_url else None)
        if not await asyncio.to_thread(self.jobs.create, record, job_input):  # the same key, concurrently
            return await asyncio.to_thread(self.jobs.record, generation_id) or record
        task = asyncio.get_running_loop().create_task(self._submit(generation_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _submit(self, generation_id: str) -> None:
        try:  # the runner's request lasts as long as the job; should it be lost, a sweep resubmits the job
            await self.runner.run.remote(generation_id)
        except Exception:  # noqa: BLE001
            pass

    async def earlier_result(self, generation_id: str, request_hash: str, attempt: str,
                             deadline: float) -> GenerationRecord | None:
        """The stored result of an earlier attempt with this key (waiting for it while it
        runs: a job, or another synchronous attempt holding the claim); None once this
        attempt holds the claim and must render."""
        job = await asyncio.to_thread(self.jobs.record, generation_id)
        if job is not None:
            if job.request_hash != request_hash:
                raise claims.mismatch()
            job = await self.job_end(generation_id, deadline)
            if job is not None and job.error is not None:
                raise Reported(job.error.code, job.error.message, job.error.field)
        return await claims.claim(self.flow.storage, generation_id, request_hash, attempt, hold_s=self.claim_s,
                                  deadline=deadline)

    async def job_end(self, generation_id: str, deadline: float) -> JobRecord | None:
        """The job's record once it has ended (None: erased meanwhile)."""
        while True:
            job = await asyncio.to_thread(self.jobs.record, generation_id)
            if job is None or job.ended:
                return job
            if time.monotonic() > deadline:
                raise Timeout(f"generation {generation_id!r} is still running")
            await asyncio.sleep(0.25)
