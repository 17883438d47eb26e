"""Extra SDXL ControlNets beside IdentityNet (OpenPose, Canny, depth, or any other), as the
reference's multi-ControlNet pipeline runs them: each gets the text tokens (IdentityNet
keeps the face tokens), its own control image and strength, and its own
``control_guidance_start/end`` window, outside which it is not called; their residuals are
added to IdentityNet's.

Weights live in the weights root: ``controlnets/<name>/`` (diffusers layout; ``pose``,
``canny`` and ``depth`` for the reference's, any other folder name works too) and the
annotators that make control images from photos under ``annotators/`` (``depth/``: a
transformers depth-estimation model, DPT as the reference or Depth Anything;
``openpose/``: OpenPose's body network, :mod:`pipeline.openpose`). Canny runs on OpenCV
with the reference's thresholds. A client may also send a ready-made control image
(``preprocessed``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .errors import InvalidParameter, InvalidWeights
from .openpose import BODY_FILES
from .weights import ExtraWeights

CONTROLNETS = "controlnets"
ANNOTATORS = "annotators"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CANNY_THRESHOLDS = (100, 200)  # the reference's get_canny_image defaults
# The types with an annotator, and where its weights are: a folder under annotators/ and
# the files that mark it (canny needs none). Other types need preprocessed images.
ANNOTATOR_FOLDERS = {"depth": ("depth", ("config.json",)), "pose": ("openpose", BODY_FILES)}
PREPROCESSORS = ("canny", *ANNOTATOR_FOLDERS)
MAX_CONTROLNETS = 4


def window_end(cls, value: float, info: ValidationInfo) -> float:
    """A ControlNet window's end (validator of ``control_guidance_end``, here and in
    :class:`~pipeline.params.GenerationParams`): above its start."""
    start = info.data.get("control_guidance_start")
    if start is not None and start >= value:
        raise ValueError(f"must be above control_guidance_start ({value} <= {start})")
    return value


class ControlNetParams(BaseModel):
    """One extra ControlNet of a request (its image travels beside the parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="The folder name under controlnets/ in the weights root (pose, canny, depth, ...).")
    scale: float = Field(0.5, ge=0.0, le=2.0, description="Its strength (controlnet_conditioning_scale).")
    preprocessed: bool = Field(False, description="The image is already a control image (no annotator runs).")
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("type")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError(f"must be a folder name of lowercase letters, digits, '_' or '-' (got {value[:64]!r})")
        return value

    _window = field_validator("control_guidance_end")(classmethod(window_end))


def split_images(entries: list[Any] | None) -> tuple[list[dict], list[Any]]:
    """``[{"type": ..., "image": ..., ...}]`` (Python and HTTP) -> the parameters and the
    images, in order; an entry without an image is refused naming it."""
    params, images = [], []
    for k, entry in enumerate(entries or []):
        values = entry.model_dump() if isinstance(entry, BaseModel) else dict(entry) if isinstance(entry, dict) \
            else None
        if values is None:
            raise InvalidParameter(f"controlnets[{k}]", "must be an object with type and image")
        if values.get("image") is None:
            raise InvalidParameter(f"controlnets[{k}].image", "is required")
        images.append(values.pop("image"))
        params.append(values)
    return params, images


def available_controlnets(extras: ExtraWeights | None) -> list[str]:
    """The names under ``controlnets/`` of a weights root."""
    return [name for name in extras.names(CONTROLNETS) if NAME.fullmatch(name)] if extras is not None else []


def available_annotators(extras: ExtraWeights | None) -> list[str]:
    """The annotators under ``annotators/`` of a weights root, with canny (OpenCV)."""
    found = ["canny"]
    for kind, (folder, markers) in ANNOTATOR_FOLDERS.items():
        if extras is not None and folder in extras.names(ANNOTATORS, markers):
            found.append(kind)
    return sorted(found)


def canny(image: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """Canny edges as the reference computes them (OpenCV on the BGR picture), as RGB."""
    edges = cv2.Canny(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR), *thresholds)
    return Image.fromarray(edges, "L").convert("RGB")


class Annotators:
    """Loads the annotators under ``annotators/`` when first needed (one copy per pipeline)."""

    def __init__(self, extras: ExtraWeights | None, device, dtype) -> None:
        self.extras, self.device, self.dtype = extras, device, dtype
        self._depth = self._pose = None
        self._lock = threading.Lock()

    def control_image(self, kind: str, image: Image.Image, field: str) -> Image.Image:
        """The control image of a photo (``field`` names the entry in errors)."""
        if kind == "canny":
            return canny(image)
        if kind in ANNOTATOR_FOLDERS:
            try:
                return self.depth(image) if kind == "depth" else self.pose(image)
            except MissingAnnotator as error:
                raise InvalidParameter(field, error.reason) from None
        raise InvalidParameter(field, f"no annotator makes {kind!r} control images here (there is one for "
                                      f"{', '.join(PREPROCESSORS)}): send a ready-made control image with "
                                      "preprocessed: true")

    def depth(self, image: Image.Image):
        """A depth map as the reference draws it: the model's depth resized to the picture
        (bicubic), scaled to 0..255 per image, grey."""
        import torch

        model, processor = self._depth_model()
        pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        with torch.inference_mode():
            depth = model(pixels.to(self.device, self.dtype)).predicted_depth.float()
        depth = torch.nn.functional.interpolate(depth[:, None], size=(image.height, image.width), mode="bicubic",
                                                align_corners=False)[0, 0]
        low, high = depth.min(), depth.max()
        scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        grey = (scaled * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(grey, "L").convert("RGB")

    def pose(self, image: Image.Image) -> Image.Image:
        """The OpenPose body pose image of a photo, at its size (black when no one is found)."""
        return self._pose_model().pose_image(image)

    def _pose_model(self):
        with self._lock:
            if self._pose is None:
                from .openpose import BodyPose

                folder = self._folder("pose")
                path = next(folder / name for name in BODY_FILES if (folder / name).is_file())
                try:
                    self._pose = BodyPose(path, self.device, self.dtype)
                except Exception as error:  # torch/safetensors raise many kinds for a bad file
                    raise InvalidWeights(f"{ANNOTATORS}/openpose/{path.name}: cannot load it as OpenPose's body "
                                         f"network: {' '.join(str(error).split())[:300]}") from None
            return self._pose

    def _depth_model(self):
        with self._lock:
            if self._depth is None:
                from transformers import AutoImageProcessor, AutoModelForDepthEstimation

                folder = self._folder("depth")
                model = AutoModelForDepthEstimation.from_pretrained(str(folder)).to(self.device, self.dtype).eval()
                self._depth = (model, AutoImageProcessor.from_pretrained(str(folder)))
            return self._depth

    def _folder(self, kind: str) -> Path:
        name, markers = ANNOTATOR_FOLDERS[kind]
        folder = self.extras.folder(ANNOTATORS, name, markers) if self.extras is not None else None
        if folder is None:
            raise MissingAnnotator(kind, name, markers)
        return folder


class MissingAnnotator(InvalidParameter):
    def __init__(self, kind: str, name: str, markers: tuple[str, ...]) -> None:
        super().__init__("controlnets", f"the {kind} annotator is missing (no {ANNOTATORS}/{name}/ with "
                                        f"{' or '.join(markers)} in the weights root): send a ready-made control "
                                        "image with preprocessed: true")


class ExtraControlNets:
    """The extra ControlNets under ``controlnets/``, loaded when first asked for, on the
    IdentityNet's device and dtype, with its speed settings (``optimizations``)."""

    def __init__(self, extras: ExtraWeights | None, device, dtype, cross_attention_dim: int,
                 optimizations=None) -> None:
        self.extras, self.device, self.dtype = extras, device, dtype
        self.optimizations = optimizations
        self.cross_attention_dim = cross_attention_dim  # the text tokens' width they must attend over
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        return available_controlnets(self.extras)

    def get(self, name: str, field: str = "controlnets"):
        """The ControlNet ``controlnets/<name>/``; ``field`` names the request's entry when
        there is none."""
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name, field)
            return self._loaded[name]

    def add(self, name: str, net) -> None:
        """Use ``net`` (a diffusers ControlNetModel already in memory) as ``name``, as if it
        were ``controlnets/<name>/``."""
        with self._lock:
            self._loaded[name] = self._prepare(net, f"the ControlNet {name!r}")

    def _load(self, name: str, field: str):
        from diffusers import ControlNetModel

        folder = self.extras.folder(CONTROLNETS, name) if self.extras is not None else None
        if folder is None:
            raise InvalidParameter(field, f"no ControlNet {name!r}: the weights root has no {CONTROLNETS}/{name}/ "
                                          f"(there: {', '.join(self.available()) or 'none'})")
        try:
            net = ControlNetModel.from_pretrained(str(folder), dtype=self.dtype)
        except Exception as error:  # diffusers raises many kinds for a bad folder
            raise InvalidWeights(f"{CONTROLNETS}/{name}/: cannot load it as a ControlNet: "
                                 f"{' '.join(str(error).split())[:300]}") from None
        return self._prepare(net, f"{CONTROLNETS}/{name}/")

    def _prepare(self, net, where: str):
        from .adapter import AttnProcessor

        if net.config.cross_attention_dim != self.cross_attention_dim:
            raise InvalidWeights(f"{where} attends over {net.config.cross_attention_dim}-wide tokens, "
                                 f"the UNet's text tokens are {self.cross_attention_dim} wide (an SD 1.5 ControlNet?)")
        net.set_attn_processor(AttnProcessor())
        net = net.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.optimizations is not None:
            from .optimize import optimize_extra_controlnet

            optimize_extra_controlnet(net, self.optimizations)
        return net


def control_images_for(entries: list[ControlNetParams], images, size: tuple[int, int], nets: ExtraControlNets,
                       annotators: Annotators) -> tuple[np.ndarray, ...]:
    """Each extra ControlNet's control image (its annotator's, unless preprocessed), framed
    as the keypoints are; its weights are loaded here, so a missing one is refused before
    any render."""
    from .img2img import frame_picture

    if len(images) != len(entries):
        raise InvalidParameter(f"controlnets[{len(images)}].image", "is required")
    framed = []
    for k, (entry, image) in enumerate(zip(entries, images)):
        nets.get(entry.type, f"controlnets[{k}].type")
        if not entry.preprocessed:
            image = annotators.control_image(entry.type, image, f"controlnets[{k}].preprocessed")
        framed.append(frame_picture(image, size))
    return tuple(framed)


@dataclass
class ExtraControl:
    """One extra ControlNet in a render: its net, the steps it runs at, its control images
    and strengths (per image, doubled for CFG)."""

    net: Any
    keeps: list[bool]
    images: Any  # tensor
    scale: Any  # tensor, one strength per row

    @classmethod
    def of(cls, net, index: int, items, keeps: list[bool], cfg: bool, per_item) -> "ExtraControl":
        import torch

        from .identitynet import to_tensor

        weight = next(net.parameters())
        images = torch.stack([to_tensor(i.controls[index]) for i in items]).to(weight.device, weight.dtype)
        return cls(net, keeps, torch.cat([images, images]) if cfg else images,
                   per_item([i.control_scales[index] for i in items]).view(-1, 1, 1, 1))

    def add_residuals(self, down, mid, step: int, model_input, t, text, added):
        """``down``/``mid`` (IdentityNet's, or None) plus this net's at ``step``, when its
        window holds the step; it gets the text tokens."""
        from .identitynet import scale_residual

        if not self.keeps[step]:
            return down, mid
        more_down, more_mid = self.net(model_input, t, encoder_hidden_states=text, controlnet_cond=self.images,
                                       conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
        more_down = [scale_residual(d, self.scale, None) for d in more_down]
        more_mid = scale_residual(more_mid, self.scale, None)
        if down is None:
            return more_down, more_mid
        return [a + b for a, b in zip(down, more_down)], mid + more_mid
