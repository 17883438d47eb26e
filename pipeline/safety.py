"""The output safety check: a classifier run on every output before it is kept, and what
happens to an image it flags.

The classifier is the Stable Diffusion safety checker in diffusers layout, found in the
weights root: ``safety_checker/`` (diffusers' ``StableDiffusionSafetyChecker``: a CLIP
vision tower, its projection, and the embeddings and thresholds of the concepts it screens
for) with ``feature_extractor/`` (its ``CLIPImageProcessor``). An image is flagged when its
embedding is closer to a screened concept than that concept's threshold, as diffusers
decides it; the checker's own answer, a black square in place of the image, is never used:
the policy decides, and the caller is told per image.

Policies: ``block`` (the image is not kept: the caller gets its verdict and no picture),
``blur`` (kept blurred past recognition), ``flag`` (kept as it is, marked flagged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidParameter, WeightsNotFound

POLICIES = ("block", "blur", "flag")
CHECKER_DIR, EXTRACTOR_DIR = "safety_checker", "feature_extractor"
EXTRACTOR_MARKER = "preprocessor_config.json"


@dataclass(frozen=True)
class Verdict:
    """What the check found and did, for one image: ``action`` is ``none`` (not flagged),
    ``blocked``, ``blurred`` or ``flagged``."""

    flagged: bool
    action: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_policy(policy: str, field: str = "safety_policy") -> str:
    if policy not in POLICIES:
        raise InvalidParameter(field, f"must be one of {list(POLICIES)}, not {policy!r}")
    return policy


def has_checker(root: str | Path) -> bool:
    """Whether a local weights root holds the checker."""
    root = Path(root)
    return (root / CHECKER_DIR / "config.json").is_file() and (root / EXTRACTOR_DIR / EXTRACTOR_MARKER).is_file()


class SafetyChecker:
    """The classifier, loaded from a weights root (CPU by default: it runs beside the
    encoding, never on a GPU replica's path)."""

    def __init__(self, model, processor, device: str = "cpu") -> None:
        self.model, self.processor, self.device = model, processor, device

    @classmethod
    def from_weights(cls, root: str | Path, *, cache_dir: str | Path | None = None, s3_endpoint: str | None = None,
                     device: str = "cpu") -> "SafetyChecker":
        """From a weights root: a folder or ``s3://bucket/prefix`` (downloaded into the node
        cache, as the models are)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from .weights import ExtraWeights

        extras = ExtraWeights(root, cache_dir, s3_endpoint)
        checker = extras.top_folder(CHECKER_DIR)
        extractor = extras.top_folder(EXTRACTOR_DIR, markers=(EXTRACTOR_MARKER,))
        if checker is None or extractor is None:
            raise WeightsNotFound(f"{CHECKER_DIR}/ and {EXTRACTOR_DIR}/", str(root),
                                  "the Stable Diffusion safety checker in diffusers layout (its "
                                  "StableDiffusionSafetyChecker and CLIPImageProcessor)")
        model = StableDiffusionSafetyChecker.from_pretrained(str(checker)).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(str(extractor))
        return cls(model, processor, device)

    def flags(self, images: list[np.ndarray]) -> list[bool]:
        """Per HxWx3 RGB uint8 image: whether the classifier flags it."""
        import torch

        if not images:
            return []
        inputs = self.processor(images=list(images), return_tensors="pt")
        clip_input = inputs["pixel_values"].to(self.device, dtype=self.model.dtype)
        placeholders = [np.zeros((1, 1, 3), np.float32) for _ in images]  # the checker blacks these, not ours
        with torch.inference_mode():
            _, flagged = self.model(clip_input=clip_input, images=placeholders)
        return [bool(f) for f in flagged]


def blur(image: np.ndarray) -> np.ndarray:
    """The picture blurred past recognition (a Gaussian of a sixteenth of its longer side)."""
    from PIL import Image, ImageFilter

    radius = max(image.shape[:2]) / 16
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def apply_policy(images: list[np.ndarray], flagged: list[bool],
                 policy: str) -> list[tuple[np.ndarray | None, Verdict]]:
    """Each image as the policy keeps it (None: blocked) with its verdict."""
    check_policy(policy)
    kept = []
    for image, flag in zip(images, flagged, strict=True):
        if not flag:
            kept.append((image, Verdict(False, "none")))
        elif policy == "block":
            kept.append((None, Verdict(True, "blocked")))
        elif policy == "blur":
            kept.append((blur(image), Verdict(True, "blurred")))
        else:
            kept.append((image, Verdict(True, "flagged")))
    return kept
