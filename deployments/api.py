"""The HTTP API's request and response models (they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Literal

from functools import cache

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.controlnets import MAX_CONTROLNETS, ControlNetParams
from pipeline.errors import InvalidParameter
from pipeline.params import GenerationParams
from pipeline.people import MAX_PEOPLE, PersonParams
from service.config import FACE_IMAGES_CAP
from service.records import Face, JobError, JobStatus, OutputFormat, Progress

IMAGE_REF = (
    "An image: a data: URL (data:image/png;base64,...), plain base64, or the s3:// reference of a photo "
    "this API key uploaded (POST /v1/uploads)."
)


@cache
def _known_keys(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for field_name, field in model.model_fields.items() for name in (field_name, field.alias)
                     if name)


def refuse_unknown_keys(model: type[BaseModel], data):
    """One error for the first key ``model`` does not know (pydantic's ``extra="forbid"``
    would build an error object per unknown key, millions of them for a body made of keys)."""
    if isinstance(data, dict):
        known = _known_keys(model)
        for key in data:
            if key not in known:
                raise InvalidParameter(str(key)[:64], "is not a known parameter")
    return data


class ControlNetRequest(ControlNetParams):
    """One extra ControlNet: its parameters and its image."""

    image: str = Field(description=f"The photo its annotator reads, or (preprocessed) its control image. {IMAGE_REF}")


class PersonRequest(PersonParams):
    """One of several people: their face (photos or a registered ``face_id``) and where it
    goes (a ``box``, or where their face is in a ``pose_image``)."""

    face_images: list[str] | None = Field(None, min_length=1, max_length=FACE_IMAGES_CAP,
                                          description=f"1 to 4 photos of this person. {IMAGE_REF}")
    face_id: str | None = Field(None, description="A face registered with POST /v1/faces (instead of face_images).")
    pose_image: str | None = Field(None, description="Instead of a box: the face goes where it is in this photo (its "
                                                     "head pose too), the photo framed to the output as a single "
                                                     f"person's pose is. {IMAGE_REF}")

    @model_validator(mode="after")
    def _one_face_one_place(self) -> "PersonRequest":
        if (self.face_images is None) == (self.face_id is None):
            raise ValueError("needs its face: face_images (photos) or face_id, exactly one of them")
        if (self.box is None) == (self.pose_image is None):
            raise ValueError("needs exactly one of box (where the face goes) and pose_image")
        return self


class GenerationRequest(GenerationParams):
    """``POST /v1/generations``: a face (photos or a registered ``face_id``), or several
    people each with theirs, and what to render."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    face_images: list[str] | None = Field(None, min_length=1, max_length=FACE_IMAGES_CAP,
                                          description=f"1 to 4 photos of one person. {IMAGE_REF}")
    face_id: str | None = Field(None, description="A face registered with POST /v1/faces (instead of face_images).")
    pose_image: str | None = Field(None, description=f"Take the head pose from this photo. {IMAGE_REF}")
    image: str | None = Field(None, description="Restyle this picture (img2img, see strength); the head pose comes "
                                                f"from its face unless pose_image is given. {IMAGE_REF}")
    mask_image: str | None = Field(None, description="With image: repaint only where this mask is white "
                                                     f"(inpainting); the picture's size. {IMAGE_REF}")
    controlnets: list[ControlNetRequest] = Field(
        default_factory=list, max_length=MAX_CONTROLNETS,
        description="Extra ControlNets beside IdentityNet: [{type, image, scale, preprocessed, "
                    "control_guidance_start, control_guidance_end}]; GET /v1/options lists the types offered."
    )
    people: list[PersonRequest] = Field(
        default_factory=list, max_length=MAX_PEOPLE,
        description=f"Several people in one picture (1 to {MAX_PEOPLE}) instead of face_images/face_id: "
                    "[{face_images | face_id, box | pose_image}]. Each person's face tokens and IdentityNet act only "
                    "in their region (box: [x1, y1, x2, y2] in output pixels; regions may not overlap); the prompt "
                    "describes the scene. Needs width and height."
    )
    face_combine: Literal["mean", "norm_mean"] = Field("mean", description="How several photos (of a face, or of "
                                                                            "each person) are combined.")
    output_format: OutputFormat = "png"
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality.")
    run_async: bool = Field(False, alias="async", description="Answer 202 with a job at once (as does the header "
                                                              "`Prefer: respond-async`).")
    webhook_url: str | None = Field(None, max_length=2048, description="Receives one signed POST when the job "
                                                                       "ends (implies async).")

    _known_keys_only = model_validator(mode="before")(classmethod(refuse_unknown_keys))

    @model_validator(mode="after")
    def _faces_in_people(self) -> "GenerationRequest":
        if self.people:
            for name in ("face_images", "face_id", "pose_image"):
                if getattr(self, name) is not None:
                    raise InvalidParameter(name, "give each person's face (and pose) in people, not beside it")
        return self

    def with_defaults(self, defaults: dict) -> "GenerationRequest":
        """This request with ``defaults`` (e.g. a few-step preset's steps, guidance and
        scheduler) in place of the fields the client left out."""
        unset = {name: value for name, value in defaults.items() if name not in self.model_fields_set}
        return self.model_copy(update=unset) if unset else self

    def generation_params(self, **overrides) -> GenerationParams:
        values = self.model_dump(include=set(GenerationParams.model_fields))
        values["controlnets"] = [{k: v for k, v in entry.items() if k != "image"} for entry in values["controlnets"]]
        values["people"] = [{k: v for k, v in entry.items() if k in PersonParams.model_fields}  # no face data
                            for entry in values["people"]]
        values.update(overrides)
        return GenerationParams(**values)


class FaceRequest(BaseModel):
    """``POST /v1/faces``: register a face once, render it many times."""

    model_config = ConfigDict(extra="forbid")

    face_images: list[str] = Field(min_length=1, max_length=FACE_IMAGES_CAP,
                                   description=f"1 to 4 photos of one person. {IMAGE_REF}")
    pose_image: str | None = Field(None, description=f"Default head pose for renders of this face. {IMAGE_REF}")
    face_combine: Literal["mean", "norm_mean"] = "mean"

    _known_keys_only = model_validator(mode="before")(classmethod(refuse_unknown_keys))


class ConsentAttestation(BaseModel):
    """Who attests that the person whose face this is agreed to its registration, and on
    what basis (stored with the face, returned by ``GET /v1/faces/{id}``)."""

    model_config = ConfigDict(extra="forbid")

    attested_by: str = Field(min_length=1, max_length=256, description="Who attests (a person, role or account "
                                                                       "of the operator's customer).")
    basis: str = Field(min_length=1, max_length=1000, description="On what basis: e.g. 'the subject is the "
                                                                   "account holder', 'signed release form #123'.")


class FaceRegistration(FaceRequest):
    """``POST /v1/faces``: the photos, and the consent attestation without which no face is
    registered."""

    consent: ConsentAttestation = Field(description="Required: who attests the person's consent, and on what basis.")


class UploadRequest(BaseModel):
    """``POST /v1/uploads``: the photo's content type (the store holds the upload to it)."""

    model_config = ConfigDict(extra="forbid")

    content_type: Literal["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"]

    _known_keys_only = model_validator(mode="before")(classmethod(refuse_unknown_keys))


class VerifyRequest(BaseModel):
    """``POST /v1/verify``: an image to read the invisible watermark and C2PA manifest of."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=f"The picture (PNG, JPEG or WebP, as this service stored it or changed since). "
                                   f"{IMAGE_REF}")

    _known_keys_only = model_validator(mode="before")(classmethod(refuse_unknown_keys))


class WatermarkReading(BaseModel):
    found: bool = Field(description="A watermark of this software (payload and CRC) reads back from the picture.")
    this_service: bool = Field(description="It carries this service's tag (its configured watermark.service).")
    generation_id: str | None = Field(None, description="The generation it names (`GET /v1/generations/{id}` "
                                                        "finds it while its owner keeps it).")
    id_sha256_prefix: str | None = Field(None, description="For an offline render's row: the first 16 bytes of "
                                                           "SHA-256 of the row id, hex.")


class ManifestReading(BaseModel):
    valid: bool = Field(description="The manifest's signature and its bindings to the pixels and assertions check out.")
    trusted: bool | None = Field(None, description="Its signer's certificate leads to this service's own CA (None: "
                                                   "this server signs nothing, so has no CA to compare with).")
    errors: list[str] = Field(default_factory=list, description="C2PA validation failure codes.")
    generator: str = Field(description="The claim generator: the service that signed it, and its version.")
    created_by_algorithm: bool = Field(description="It states c2pa.created with digital source type "
                                                   "trainedAlgorithmicMedia.")
    generation: dict | None = Field(None, description="The generation settings it states (never face data).")
    signer: str | None = Field(None, description="The signing certificate's subject and issuer.")


class VerifyResponse(BaseModel):
    watermark: WatermarkReading
    c2pa: ManifestReading | None = Field(None, description="The C2PA manifest, when the file carries one.")
    width: int
    height: int


class UploadResponse(BaseModel):
    image: str = Field(description="The s3:// reference to give in face_images or pose_image once uploaded.")
    url: str = Field(description="Where to POST the upload (multipart form data: the fields, then `file`).")
    fields: dict[str, str] = Field(description="Form fields the upload must carry, as given.")
    max_bytes: int = Field(description="The largest photo the store takes.")
    expires_at: float = Field(description="When the upload URL stops working (unix seconds).")


class SafetyResult(BaseModel):
    flagged: bool = Field(description="The output safety classifier flagged this image.")
    action: Literal["none", "blocked", "blurred", "flagged"] = Field(
        description="What was done: none (not flagged), blocked (not stored: no url), blurred, or flagged (stored "
                    "as it is).")


class Image(BaseModel):
    url: str | None = Field(description="Where to fetch the image; expires (presigned). None when the safety check "
                                        "blocked it.")
    seed: int
    width: int
    height: int
    watermarked: bool = Field(False, description="The invisible watermark naming this generation reads back from "
                                                 "the stored file (`instantid verify`; pictures under 256x256 pixels "
                                                 "in area carry none).")
    c2pa: bool = Field(False, description="The file carries a signed C2PA manifest (created by a trained algorithm, "
                                          "this service, the generation settings; `instantid verify`).")
    safety: SafetyResult | None = Field(None, description="The output safety check's verdict (absent when the "
                                                          "server runs none).")


class GenerationResponse(BaseModel):
    id: str
    images: list[Image]
    face: Face
    timings_ms: dict[str, float]
    batch_size: int = Field(description="Images rendered together in the diffusion batch that made these.")


class ConsentRecord(ConsentAttestation):
    attested_at: float


class FaceResponse(BaseModel):
    face_id: str
    face: Face
    created_at: float
    consent: ConsentRecord | None = Field(None, description="The attestation given when the face was registered.")


class FaceErasure(BaseModel):
    """``DELETE /v1/faces/{id}?cascade=true``: the face and the generations made from it are gone."""

    face_id: str
    generations_erased: int = Field(description="Generations made from the face that were erased (running ones "
                                                "canceled); ones already gone do not count.")


class Job(BaseModel):
    """``GET /v1/generations/{id}``: a generation, finished or not."""

    id: str
    status: JobStatus
    stage: str | None = Field(None, description="queued, face, starting (a Generator replica is starting: the "
                                                "service had scaled it to zero), rendering, storing, done")
    progress: Progress | None = None
    created_at: float | None = None
    updated_at: float | None = None
    images: list[Image] = Field(default_factory=list)
    face: Face | None = None
    batch_size: int | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: JobError | None = None


class FaceAnalysis(BaseModel):
    """``POST /v1/faces/analyze``: the face the service would use (nothing is stored)."""

    face: Face


class ErrorResponse(BaseModel):
    error: JobError


class WebhookSecret(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of this API key's webhook signatures.")


class Health(BaseModel):
    status: Literal["ok"]
    stages: list[dict]
