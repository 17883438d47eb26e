"""What the service stores, as typed records: faces, generations and jobs. The ingress,
the job runner, the Postprocessor, the Janitor and the offline renderer all read and
write these models (JSON in storage), never untyped dicts.

:class:`Face` (:class:`pipeline.face.FaceSummary`) is the one public face model: the CLI
reports it, the HTTP API shows it, records keep it; a stored face adds the embedding
(:class:`StoredFace`), which no response ever carries.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from pipeline.face import FaceInfo, face_geometry
from pipeline.face import FaceSummary as Face
from pipeline.params import GenerationParams

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "canceled")
OutputFormat = Literal["png", "jpeg", "webp"]


EncodedImage = Annotated[  # image bytes, written in JSON as base64
    bytes,
    BeforeValidator(lambda value: base64.b64decode(value, validate=True) if isinstance(value, str) else value),
    PlainSerializer(lambda value: base64.b64encode(value).decode("ascii"), when_used="json"),
]


class _Record(BaseModel):
    # a newer writer may add fields; "no expiry" (inf) is written as JSON's Infinity
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class StoredFace(Face):
    """A face with its identity embedding, exactly as analysed (what renders need: a job
    rendered from it makes the same bytes as a render from the analysis itself). Never in
    a response."""

    embedding: list[float]

    @classmethod
    def of(cls, info: FaceInfo) -> "StoredFace":
        return cls(**face_geometry(info), embedding=[float(v) for v in np.asarray(info.embedding).ravel()])

    def to_info(self) -> FaceInfo:
        return FaceInfo(bbox=tuple(self.bbox), kps=tuple((x, y) for x, y in self.kps), det_score=self.det_score,
                        embedding=np.asarray(self.embedding, dtype=np.float32),
                        image_size=(self.image_size[0], self.image_size[1]))


class Expiring(_Record):
    """Any stored record: it is kept until ``expires_at`` (its retention)."""

    expires_at: float = float("inf")

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at < (time.time() if now is None else now)


class _Owned(Expiring):
    owner: str
    created_at: float = Field(default_factory=time.time)


class Consent(_Record):
    """Who attested that the person in a registered face agreed to it, and on what basis."""

    attested_by: str
    basis: str
    attested_at: float = Field(default_factory=time.time)


class FaceRecord(_Owned):
    """``faces/<face_id>.json``: a registered face."""

    face_id: str
    face: StoredFace
    consent: Consent | None = None  # (faces registered before consent was asked for have none)


class OutputSpec(_Record):
    """How a generation's images are encoded."""

    format: OutputFormat = "png"
    quality: int = Field(90, ge=1, le=100)


class SafetyVerdict(_Record):
    flagged: bool
    action: Literal["none", "blocked", "blurred", "flagged"]


class GenerationRecord(_Owned):
    """``generations/<id>/record.json``: a stored generation (written last)."""

    id: str
    face: Face
    request_hash: str | None = None
    keys: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    width: int = 0
    height: int = 0
    batch_size: int = 0
    watermarked: list[bool] = Field(default_factory=list)  # per image: the invisible mark reads back from it
    safety: list[SafetyVerdict] = Field(default_factory=list)  # per image, when the safety check ran
    c2pa: bool = False  # every stored image carries a signed C2PA manifest


class JobError(_Record):
    code: str = Field(description="Stable machine-readable code, e.g. no_face, invalid_parameter, overloaded.")
    message: str
    field: str | None = None


class Progress(_Record):
    step: int
    total: int


class WebhookState(_Record):
    url: str
    delivered: bool | None = None  # None: not attempted yet
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None


class JobRecord(_Owned):
    """``jobs/<id>/record.json``: an async generation while it runs and after."""

    id: str
    status: JobStatus = "queued"
    stage: str | None = "queued"
    progress: Progress | None = None
    updated_at: float = Field(default_factory=time.time)
    error: JobError | None = None
    request_hash: str | None = None
    webhook: WebhookState | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    attempts: int = 0  # how many runners started it (more than one: taken over)

    @property
    def ended(self) -> bool:
        return self.status in FINAL_STATUSES


class PersonInput(_Record):
    """One person's face (``params.people[k]``), kept as a job's face is: analysed (kept
    until the job ends), or registered, named by id (read when the job runs) with the head
    pose of their pose photo when they have one."""

    face: StoredFace | None = None
    face_id: str | None = None
    pose: Face | None = None


class JobInput(_Record):
    """``jobs/<id>/input.json``: everything a runner needs to render the job, on any
    replica, as often as it is taken over (the seed is fixed: the same bytes each time).
    A registered face is named by id (read when the job runs); an analysed one is kept
    here until the job ends. Several people: ``people`` (one per ``params.people``
    entry), and neither ``face`` nor ``face_id``."""

    params: GenerationParams
    face: StoredFace | None = None
    face_id: str | None = None
    pose: Face | None = None  # head pose from another photo, for a registered face
    people: list[PersonInput] = Field(default_factory=list)
    output: OutputSpec = Field(default_factory=OutputSpec)
    image: EncodedImage | None = None  # img2img/inpainting: the picture, as sent (kept until the job ends)
    mask_image: EncodedImage | None = None
    controls: list[EncodedImage] = Field(default_factory=list)  # the extra ControlNets' images


class Lease(_Record):
    """``jobs/active/<id>.json``: exists while a job is not finished; ``holder`` runs it
    until ``expires_at`` unless it renews the lease."""

    holder: str | None = None
    expires_at: float = 0.0
