"""Plain, picklable messages passed between the deployments."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.batching import RenderRequest
from service.records import GenerationRecord, OutputSpec


@dataclass
class FaceJob:
    """Photos to analyse (bytes as sent), with the field names errors should name."""

    images: list[bytes]
    pose: bytes | None = None
    combine: str = "mean"
    names: list[str] | None = None  # e.g. "face_images[1]"
    pose_name: str = "pose_image"  # the field the pose photo came in (``image`` when it is the picture)


@dataclass(frozen=True)
class Pictures:
    """img2img/inpainting: the picture to start from and its mask (bytes as sent)."""

    image: bytes | None = None
    mask: bytes | None = None
    controls: tuple[bytes, ...] = ()  # the extra ControlNets' images, in order


@dataclass
class GenerationJob:
    """What the Generator renders, and how the Postprocessor stores it: ``record`` is the
    generation's record without its image keys (the store step adds them)."""

    request: RenderRequest
    output: OutputSpec
    record: GenerationRecord
    settings: dict = field(default_factory=dict)  # what the images' C2PA manifests state (public settings only)


@dataclass
class StoredGeneration:
    record: GenerationRecord  # the record that stands (this attempt's, or an earlier one's)
    replayed: bool = False  # an earlier attempt had already stored this generation
    timings_ms: dict[str, float] = field(default_factory=dict)
