"""Starting from a picture: img2img (``image`` + ``strength``) and inpainting (+ ``mask_image``).

The math is diffusers' SDXL img2img and inpainting pipelines' for a 4-channel UNet (the
reference's img2img and inpaint pipelines are built on them):

* the schedule keeps its last ``int(steps * strength)`` steps (:func:`start_step`);
* img2img starts from the picture's latents noised to the first kept step;
  inpainting at strength 1.0 starts from pure noise, like text-to-image;
* inpainting puts the picture's latents, noised to the next step, back wherever the mask
  is 0 after every step, so the unmasked area ends as the picture's own latents;
* after decoding, the unmasked area is the picture's own pixels (:func:`keep_unmasked_pixels`).

One choice differs: the picture is encoded to the mean of the VAE's latent distribution
instead of a sample of it (the VAE's spread is tiny next to the noise added), so the seed
draws the noise alone and an inpainting at strength 1.0 under a white mask renders the
very pixels text-to-image renders with that seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import InvalidParameter
from .keypoints import Frame

DEFAULT_STRENGTH = 0.8  # diffusers' SDXL img2img default
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting repaints the masked area from noise


def default_strength(strength: float | None, inpaint: bool) -> float:
    if strength is not None:
        return strength
    return DEFAULT_INPAINT_STRENGTH if inpaint else DEFAULT_STRENGTH


def start_step(num_steps: int, strength: float) -> int:
    """The first step run of a ``num_steps`` schedule at ``strength`` (diffusers' rule);
    a strength that leaves no step is refused."""
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise InvalidParameter("strength", f"{strength} of {num_steps} steps leaves no step to run; raise strength "
                                           "or num_inference_steps")
    return num_steps - kept


def frame_picture(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` scaled to cover ``size`` (width, height) and centred, as keypoints are
    mapped (:class:`~pipeline.keypoints.Frame`): HxWx3 uint8."""
    return np.asarray(_cover(image.convert("RGB"), size, Image.Resampling.BICUBIC), dtype=np.uint8)


def frame_mask(mask: Image.Image, image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The mask framed as its picture is: HxW uint8, 255 where to repaint, 0 where to keep.
    Any mode is read as brightness (white repaints); it must be the picture's size."""
    if mask.size != tuple(image_size):
        raise InvalidParameter("mask_image", f"must be the size of image ({image_size[0]}x{image_size[1]}), "
                                             f"got {mask.size[0]}x{mask.size[1]}")
    framed = np.asarray(_cover(mask.convert("L"), size, Image.Resampling.NEAREST), dtype=np.uint8)
    return np.where(framed >= 128, 255, 0).astype(np.uint8)


def _cover(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    frame = Frame(image.size, size)
    scaled = (max(size[0], round(image.width * frame.scale)), max(size[1], round(image.height * frame.scale)))
    left, top = (scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2
    return image.resize(scaled, resample).crop((left, top, left + size[0], top + size[1]))


@dataclass
class StartImage:
    """What the render loop needs of the pictures of one batch."""

    latents: torch.Tensor  # the pictures' latents (scaled as the UNet sees them)
    mask: torch.Tensor | None  # 1 where to repaint, at the latents' size; None: img2img
    first: int  # index of the first step run in the full schedule

    def initial_latents(self, noise: torch.Tensor, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """Inpainting at full strength starts from noise (as text-to-image); otherwise the
        pictures noised to the first step run."""
        if self.mask is not None and self.first == 0:
            return noise * scheduler.init_noise_sigma
        return scheduler.add_noise(self.latents, noise, timesteps[:1].repeat(noise.shape[0]))

    def keep_unmasked(self, latents: torch.Tensor, noise: torch.Tensor, scheduler, timesteps: torch.Tensor,
                      step: int) -> torch.Tensor:
        """After step ``step``: the pictures' latents, noised to the next step, where the
        mask is 0 (the last step puts them back unnoised)."""
        if self.mask is None:
            return latents
        kept = self.latents
        if step < len(timesteps) - 1:
            kept = scheduler.add_noise(kept, noise, timesteps[step + 1: step + 2])
        return (1 - self.mask) * kept + self.mask * latents


def truncate_schedule(scheduler, num_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """The timesteps run at ``strength`` (the scheduler's ``set_timesteps`` already called)
    and the index of the first in the full schedule; the scheduler starts there."""
    first = start_step(num_steps, strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)
    return scheduler.timesteps[first:], first


def encode_pictures(vae, pictures: list[np.ndarray], *, upcast: bool, device, dtype) -> torch.Tensor:
    """HxWx3 uint8 pictures -> latents as the UNet sees them (mean of the VAE's
    distribution; ``latents_mean/std`` applied when the VAE's config has them)."""
    pixels = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)
    pixels = pixels / 127.5 - 1.0
    model_dtype = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels.to(torch.float32 if upcast else model_dtype)).latent_dist.mode()
    finally:
        if upcast:
            vae.to(model_dtype)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = (latents - mean) * config.scaling_factor / std
    else:
        latents = latents * config.scaling_factor
    return latents.to(dtype)


def latent_mask(masks: list[np.ndarray], latent_size: tuple[int, int], *, device, dtype) -> torch.Tensor:
    """HxW uint8 masks (255 repaints) -> Nx1xhxw at the latents' size (nearest, as diffusers)."""
    mask = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32) / 255.0)
    mask = (mask >= 0.5).float()
    return torch.nn.functional.interpolate(mask, size=latent_size).to(device=device, dtype=dtype)


def keep_unmasked_pixels(image: Image.Image, picture: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The decoded image where the mask repaints, the picture's own pixels elsewhere: the
    VAE decoder's attention sees the whole latent, so decoding alone would shift the kept
    area slightly; the reference's face swap pastes its result into the photo the same way."""
    out = np.where(mask[..., None] >= 128, np.asarray(image), picture)
    return Image.fromarray(out.astype(np.uint8), "RGB")
