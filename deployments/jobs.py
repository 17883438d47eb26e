"""Plain, picklable messages passed between the deployments."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.face import FaceInfo
from pipeline.params import GenerationParams


@dataclass
class FaceJob:
    images: list[bytes]
    pose: bytes | None = None
    combine: str = "mean"
    names: list[str] | None = None  # field names for error messages, e.g. "face_images[1]"


@dataclass
class OutputSpec:
    """How and where the Postprocessor stores a generation, and the record it writes
    once the images are stored (the generation's completion marker)."""

    key_prefix: str  # e.g. "generations/g_abc"
    format: str = "png"
    quality: int = 90
    url_expiry_s: int = 3600
    record: dict = field(default_factory=dict)  # owner, face, request hash...


@dataclass
class GenerationJob:
    id: str
    params: GenerationParams  # ``lora`` already resolved to a path on the node
    face: FaceInfo
    output: OutputSpec


@dataclass
class RenderedImages:
    id: str
    images: list[np.ndarray]  # HxWx3 uint8
    seeds: list[int]
    width: int
    height: int
    batch_size: int  # images rendered together in the batch that made these
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class StoredImages:
    record: dict  # the stored generation record (keys, seeds, size, face, owner...)
    urls: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)
    replayed: bool = False  # an earlier attempt had already completed this generation
