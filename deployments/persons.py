"""Several people in one picture (``people`` of ``POST /v1/generations``): how many photos
they may bring, and each person's face, found the one way for a synchronous request and
an async job (:class:`~service.records.PersonInput`, as a job keeps it): analysed from
their photos, the head pose from their ``pose_image`` when they have one instead of a box;
or registered (``face_id``, posed by their ``pose_image`` when given), its use recorded as
a top-level ``face_id``'s is, so that erasing that face with ``cascade`` erases the
generation too. Errors name the person's field (``people[1].face_images[0]``)."""

from __future__ import annotations

import asyncio

from pipeline.errors import InvalidParameter
from pipeline.face import face_geometry
from service.config import Limits
from service.erasure import record_use
from service.lookup import load_face
from service.records import Face, PersonInput, StoredFace

from .api import GenerationRequest, PersonRequest
from .flow import GenerationFlow
from .inputs import ImageInputs
from .messages import FaceJob


def check_photos(body: GenerationRequest, limits: Limits) -> None:
    """The people's face photos count against the request's photo limit together: at most
    ``max_face_images`` in all (as one face may bring), before any photo is read."""
    total = 0
    for k, person in enumerate(body.people):
        count = len(person.face_images or ())
        if count > limits.max_face_images:
            raise InvalidParameter(f"people[{k}].face_images", f"at most {limits.max_face_images} photos")
        total += count
    if total > limits.max_face_images:
        raise InvalidParameter("people", f"{total} face photos in all: this server takes at most "
                                         f"{limits.max_face_images} per request, counted over every person")


class People:
    def __init__(self, flow: GenerationFlow, inputs: ImageInputs, results_s: float) -> None:
        self.flow, self.inputs, self.results_s = flow, inputs, results_s

    async def inputs_of(self, body: GenerationRequest, owner: str, deadline: float,
                        generation_id: str) -> list[PersonInput]:
        """Each person's face as a job keeps it: photos analysed now, all people at once (a
        bad photo is a 4xx at once: the first person's in order), registered faces looked
        up (404/403 now); once every face is found, each registered face's use is recorded."""
        found = await asyncio.gather(*(self._person(k, person, body.face_combine, owner, deadline)
                                       for k, person in enumerate(body.people)), return_exceptions=True)
        for outcome in found:
            if isinstance(outcome, BaseException):
                raise outcome
        used = {}  # each face once, however many people it is
        for k, person in enumerate(body.people):
            if person.face_id is not None:
                used.setdefault(person.face_id, f"people[{k}].face_id")
        for face_id, field in used.items():
            await asyncio.to_thread(record_use, self.flow.storage, face_id, generation_id, owner, self.results_s,
                                    field)
        return list(found)

    async def faces(self, body: GenerationRequest, owner: str, deadline: float, generation_id: str):
        """The faces a synchronous render takes: one per person, in order."""
        return await self.flow.people_faces(await self.inputs_of(body, owner, deadline, generation_id), owner)

    async def _person(self, k: int, person: PersonRequest, combine: str, owner: str, deadline: float) -> PersonInput:
        field = f"people[{k}]"
        if person.face_id is None:
            job = await self.inputs.face_job(person.face_images, person.pose_image, combine, owner,
                                             pose_name=f"{field}.pose_image", field=f"{field}.face_images")
            return PersonInput(face=StoredFace.of(await self.flow.analyze(job, deadline)))
        await asyncio.to_thread(load_face, self.flow.storage, person.face_id, owner, field=f"{field}.face_id",
                                delete_expired=True)
        pose = None
        if person.pose_image is not None:
            photo = await self.inputs.image_bytes(person.pose_image, f"{field}.pose_image", owner)
            posed = await self.flow.analyze(FaceJob(images=[photo], names=[f"{field}.pose_image"]), deadline)
            pose = Face(**face_geometry(posed))
        return PersonInput(face_id=person.face_id, pose=pose)
