"""Generation parameters: one typed, validated model shared by the Python API, the CLI
and the HTTP API, so every entry point accepts and refuses the same things."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .controlnets import MAX_CONTROLNETS, ControlNetParams, window_end
from .errors import InvalidParameter
from .people import MAX_PEOPLE, PersonParams, check_people
from .prompts import PromptSyntaxError, check_weights
from .schedulers import SchedulerName
from .styles import canonical_style

MAX_SEED = 2**63 - 1
MAX_SIDE = 2048
MIN_SIDE = 64


class GenerationParams(BaseModel):
    """What to render, besides the face. Defaults are the reference's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_weighting: bool = Field(  # before the prompts: their validator reads it
        False, description="Read '(word:1.2)', '(word)', '[word]' in the prompts as weights and encode prompts past "
                           "77 tokens in full, as the reference's full pipeline does (default: plain SDXL encoding)."
    )
    prompt: str = Field("", max_length=4000, description="What to render; may be empty.")
    negative_prompt: str | None = Field(None, max_length=4000)
    style: str | None = Field(None, description="One of the nine reference style names (or its slug).")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="Multiple of 8; default: reference rule.")
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="Multiple of 8; default: reference rule.")
    num_inference_steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0, description="Classifier-free guidance; off at <= 1.")
    ip_adapter_scale: float = Field(0.8, ge=0.0, le=2.0, description="Weight of the face tokens in the UNet.")
    controlnet_conditioning_scale: float = Field(0.8, ge=0.0, le=2.0, description="IdentityNet strength.")
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; image k uses seed + k.")
    num_images: int = Field(1, ge=1, le=8)
    scheduler: SchedulerName = "euler"
    lora: str | None = Field(None, description="A LoRA to apply (a path, or a name the server knows).")
    lora_scale: float = Field(1.0, ge=0.0, le=2.0)
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="With image: how much of it to repaint (1.0: all; default 0.8, or 1.0 "
                                           "with mask_image)."
    )
    controlnets: list[ControlNetParams] = Field(
        default_factory=list, max_length=MAX_CONTROLNETS,
        description="Extra ControlNets beside IdentityNet (pose, canny, depth, ...), each with its control image."
    )
    enhance_face_region: bool = Field(
        False, description="Limit IdentityNet to the face box (the reference's 'enhance non-face region')."
    )
    people: list[PersonParams] = Field(
        default_factory=list, max_length=MAX_PEOPLE,
        description=f"Several people in one picture (1 to {MAX_PEOPLE}), each with their own face and a region: "
                    "their face tokens and IdentityNet act only there. Needs width and height."
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _weights_are_numbers(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("prompt_weighting"):
            try:
                check_weights(value)
            except PromptSyntaxError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("style")
    @classmethod
    def _known_style(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return canonical_style(value)
        except InvalidParameter as error:
            raise ValueError(error.reason) from None

    _window = field_validator("control_guidance_end")(classmethod(window_end))

    @model_validator(mode="after")
    def _people_fit(self) -> "GenerationParams":
        check_people(self.people, self.width, self.height)
        return self

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def seeds(self) -> list[int]:
        """One seed per image: ``seed + k`` (wrapping in 63 bits), or fresh random seeds."""
        if self.seed is None:
            return [secrets.randbits(63) for _ in range(self.num_images)]
        return [(self.seed + k) % (MAX_SEED + 1) for k in range(self.num_images)]


def seed_from(text: str) -> int:
    """A seed (63 bits) made from a text, e.g. a generation or row id: the same text, the
    same images, however often it is rendered again."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def parse_params(model: type[BaseModel] = GenerationParams, /, **values: Any):
    """Validate ``values`` into ``model``; the first problem becomes an
    :class:`InvalidParameter` naming its field."""
    try:
        return model(**values)
    except ValidationError as error:
        raise invalid_parameter_from(error) from None


def invalid_parameter_from(error: ValidationError) -> InvalidParameter:
    return invalid_parameter_from_errors(error.errors())


def invalid_parameter_from_errors(errors: list[dict], skip: tuple[str, ...] = ()) -> InvalidParameter:
    """The first of pydantic's errors as an :class:`InvalidParameter` (``face_images[1]: ...``)."""
    first = errors[0] if errors else {}
    parts = [part for part in first.get("loc", ()) if part not in skip]
    field = ""
    for part in parts:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "is not a known parameter"
    return InvalidParameter(field or "parameters", message)
