"""InstantID: zero-shot identity-preserving SDXL generation, as a plain Python library.

This package never imports Ray; the serving layer (``deployments``) wraps it.

    from pipeline import get_pipeline
    pipe = get_pipeline("weights/")            # one loaded pipeline per process, reused
    result = pipe(["me.jpg"], "a watercolor portrait", style="Watercolor", seed=7)
    result.images[0].save("out.png")
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import (
    ImageTooLarge,
    InstantIDError,
    InvalidImage,
    InvalidParameter,
    InvalidWeights,
    NoFaceDetected,
    ProviderUnavailable,
    WeightsNotFound,
)
from .face import FaceAnalyzer, FaceInfo, combine_embeddings
from .params import GenerationParams

if TYPE_CHECKING:
    from .pipeline import InstantIDPipeline

__all__ = [
    "FaceAnalyzer",
    "FaceInfo",
    "GenerationParams",
    "ImageTooLarge",
    "InstantIDError",
    "InvalidImage",
    "InvalidParameter",
    "InvalidWeights",
    "NoFaceDetected",
    "ProviderUnavailable",
    "WeightsNotFound",
    "combine_embeddings",
    "get_pipeline",
]

_PIPELINES: dict[tuple, "InstantIDPipeline"] = {}
_PIPELINES_LOCK = threading.Lock()


def get_pipeline(weights: Any, **options: Any) -> "InstantIDPipeline":
    """The process's pipeline for ``weights`` and ``options`` (see
    :meth:`InstantIDPipeline.from_weights`), loaded on first use and reused after."""
    from .pipeline import InstantIDPipeline

    key = (str(weights), tuple(sorted((k, str(v)) for k, v in options.items())))
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            _PIPELINES[key] = InstantIDPipeline.from_weights(weights, **options)
        return _PIPELINES[key]
