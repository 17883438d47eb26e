"""Face -> render -> store: the work behind a generation, the same for a synchronous
request (the ingress) and an async job (the job runner)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pipeline.face import FaceInfo
from pipeline.params import GenerationParams
from pipeline.provenance import settings_of
from service.batching import RenderRequest
from service.errors import Unavailable
from service.fairness import FairQueue
from service.lookup import load_face
from service.records import Face, GenerationRecord, OutputSpec, PersonInput
from service.storage import Storage

from service.config import AppArgs

from .calls import call, stream
from .health import ReplicaWatch
from .messages import FaceJob, GenerationJob, Pictures, StoredGeneration

EventSink = Callable[[dict], None]


class GenerationFlow:
    def __init__(self, face, generator, args: AppArgs, storage: Storage) -> None:
        self.face, self.generator, self.args, self.storage = face, generator, args, storage
        # this replica's renders reach the Generator a few at a time, API keys taking turns
        self.fair = FairQueue(args.fairness.renders_at_once, args.fairness.waiting_per_key, args.retry_after_s)
        self.generators = ReplicaWatch("Generator")  # none running: autoscaled to zero, one is starting

    async def analyze(self, job: FaceJob, deadline: float) -> FaceInfo:
        return await call(self.face.embed.remote(job), deadline, "face analysis", retry_after_s=self.args.retry_after_s)

    async def registered_face(self, face_id: str, owner: str, pose: Face | None = None,
                              field: str = "face_id") -> FaceInfo:
        """A registered face, with the head pose of another photo when one was analysed
        (errors name ``field``)."""
        record = await asyncio.to_thread(load_face, self.storage, face_id, owner, field=field, delete_expired=True)
        info = record.face.to_info()
        if pose is not None:
            posed = pose.model_dump()
            info = FaceInfo(tuple(posed["bbox"]), tuple(tuple(p) for p in posed["kps"]), info.det_score,
                            info.embedding, tuple(posed["image_size"]))
        return info

    async def people_faces(self, people: list[PersonInput], owner: str) -> tuple[FaceInfo, ...]:
        """Each person's face, as analysed, or registered (read now: a face erased since is
        a 404 naming ``people[k].face_id``)."""
        return tuple([person.face.to_info() if person.face is not None else
                      await self.registered_face(person.face_id, owner, person.pose, f"people[{k}].face_id")
                      for k, person in enumerate(people)])

    async def render(self, generation_id: str, owner: str, params: GenerationParams, face: FaceInfo,
                     output: OutputSpec, request_hash: str | None, deadline: float,
                     on_event: EventSink | None = None, pictures: Pictures = Pictures(),
                     people: tuple[FaceInfo, ...] = ()) -> StoredGeneration:
        """Render and store (the Generator hands the images to the Postprocessor, which
        creates the record once they are stored), once this replica has a place for it (a
        :class:`~service.fairness.FairQueue`: keys take turns). A Generator replica that dies
        under the render is retried once, as the proxy would retry it. Several people:
        ``people``, one face per ``params.people`` entry (``face`` is the first's: the
        record's face)."""
        notify = on_event or (lambda event: None)
        if self.fair.busy():
            notify({"stage": "queued"})
        async with self.fair.place(owner, max(0.001, deadline - time.monotonic())):
            notify({"stage": "rendering", "step": 0, "total": params.num_inference_steps})
            return await self._render(generation_id, owner, params, face, output, request_hash, deadline, notify,
                                      pictures, people)

    async def _render(self, generation_id: str, owner: str, params: GenerationParams, face: FaceInfo,
                      output: OutputSpec, request_hash: str | None, deadline: float,
                      notify: EventSink, pictures: Pictures, people: tuple[FaceInfo, ...]) -> StoredGeneration:
        lora = self.args.loras.get(params.lora) if params.lora else None
        waited_ms = None  # for a replica to start
        record = GenerationRecord(id=generation_id, owner=owner, face=Face.of(face), request_hash=request_hash,
                                  created_at=time.time(), expires_at=time.time() + self.args.retention.results_s)
        job = GenerationJob(RenderRequest(generation_id, params.model_copy(update={"lora": lora}), face,
                                          image=pictures.image, mask=pictures.mask, controls=pictures.controls,
                                          people=tuple(people)),
                            output, record, settings_of(params, mode="inpainting" if pictures.mask else
                                                        "img2img" if pictures.image else "text2img"))
        for attempt in range(2):
            try:
                called = time.monotonic()
                response = self.generator.options(stream=True).generate.remote(job)
                starting, first = self._tell_if_starting(notify), True
                try:
                    async for event in stream(response, deadline, "generation",
                                              retry_after_s=self.args.retry_after_s):
                        if first:  # a replica has the call: it waited for one to start if none ran
                            first = False
                            if starting.done() and starting.exception() is None and starting.result():
                                waited_ms = round((time.monotonic() - called) * 1000, 2)
                            starting.cancel()  # nobody is told "starting" from now on
                        if event["type"] == "result":
                            stored = event["result"]
                            if waited_ms is not None:
                                stored.timings_ms = {"starting": waited_ms, **stored.timings_ms}
                            return stored
                        notify({"stage": event.get("stage", "rendering"),
                                **{k: event[k] for k in ("step", "total") if k in event}})
                finally:
                    starting.cancel()
                raise Unavailable("the generation ended without a result", self.args.retry_after_s)
            except Unavailable:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _tell_if_starting(self, notify: EventSink) -> asyncio.Future:
        """Ask, beside the call, whether a Generator replica runs; when none does (scaled to
        zero: the call waits while Serve starts one), tell the caller ``starting``. The
        future's result: whether it did."""

        async def ask() -> bool:
            if await self.generators.running():
                return False
            notify({"stage": "starting"})
            return True

        return asyncio.ensure_future(ask())
